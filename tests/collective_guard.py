"""Run train.py (under torchrun) with every torch.distributed collective checked for rule 1 of infra/parallel.py:
a tensor handed to a collective must live on the training device. On a CPU test machine every tensor is on
the CPU, so the guard tags what *would* be on the CPU on a GPU run: tensors made by a factory without a
`device=` argument. A collective on a tagged tensor raises, naming the call.

  python -m torch.distributed.run --nproc_per_node=2 tests/collective_guard.py --loss=... (train.py's flags)
"""
import functools
import os
import runpy
import sys

import torch
import torch.distributed as dist

FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint")
# all_gather_single / reduce_scatter_single: what FSDP2 calls on torch >= 2.13 (absent on older torch).
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather_single", "reduce_scatter_single", "reduce", "gather", "scatter", "all_to_all_single")


def _tag(t):
    if isinstance(t, torch.Tensor):
        t._host_default = True
    return t


def _factory(fn):
    @functools.wraps(fn)
    def made(*a, **kw):
        t = fn(*a, **kw)
        return _tag(t) if kw.get("device") is None else t
    return made


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _collective(name, fn):
    @functools.wraps(fn)
    def checked(*a, **kw):
        for t in _tensors(list(a) + list(kw.values())):
            if getattr(t, "_host_default", False):
                raise RuntimeError(f"torch.distributed.{name} got a tensor created without device= (it would "
                                   f"be on the CPU on a GPU run, where NCCL has no CPU collectives)")
        return fn(*a, **kw)
    return checked


def install():
    for name in FACTORIES:
        setattr(torch, name, _factory(getattr(torch, name)))
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _collective(name, getattr(dist, name)))


if __name__ == "__main__":
    install()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    sys.argv = [os.path.join(root, "train.py")] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
