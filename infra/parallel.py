"""
How a run spreads over ranks: process group, DDP / FSDP2 wrapping, and the few collectives train.py,
onpolicy.py and eval use. Two rules hold everywhere (gloo on CPU would hide a breach; NCCL on GPUs hangs
or dies on it):
  1. every tensor handed to torch.distributed lives on the training device (NCCL has no CPU collectives);
  2. every rank makes the same collective calls the same number of times: work that is split unevenly
     (eval and reference batches) is padded with dummy calls so the counts match (`even_share`); generation
     runs inside `gathered`, which makes it free of collectives, so ranks may generate unequally.
"""
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def setup(timeout_s: float = 3600, cuda: Optional[bool] = None):
    """(rank, gpu, world, distributed): gpu is this process's CUDA ordinal (0 without CUDA). Under torchrun,
    even with --nproc_per_node=1, the process group is created and the model wrapped, so one GPU already
    exercises NCCL and the wrappers. The timeout must outlast the longest one-rank phase (rank 0 writing a
    7B checkpoint while the others wait). cuda: NCCL on this process's GPU, else gloo (default: whether
    CUDA is available)."""
    if "LOCAL_RANK" not in os.environ:          # plain `python train.py`: no process group
        return 0, 0, 1, False
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and torch.cuda.device_count() == 0:
        raise SystemExit("error: a CUDA device was asked for (--device cuda), but none is visible to this process")
    # LOCAL_RANK counts a node's processes; a launcher that shows each process only its own GPU
    # (CUDA_VISIBLE_DEVICES per rank) leaves one visible device, ordinal 0, whatever LOCAL_RANK says.
    gpu = int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count() if cuda else 0
    if cuda:
        torch.cuda.set_device(gpu)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), gpu, dist.get_world_size(), True


def shutdown():
    """End the process group on every rank at once (a barrier first), before the interpreter exits."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place global reduction (sum by default) of a tensor that is already on the training device."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s value of a small picklable object, on every rank (e.g. which checkpoint to resume)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def even_share(items: list, rank: int, world: int) -> list:
    """This rank's items (i, i + world, ...) padded with None up to every rank's count, so that a loop
    that runs a collective forward per item (FSDP2) runs it equally often on every rank."""
    per_rank = -(-len(items) // world)
    mine = items[rank::world]
    return mine + [None] * (per_rank - len(mine))


def wrap(model, parallel: str, device, bf16: bool, distributed: bool):
    """DDP, or FSDP2 with fp32 sharded master weights (bf16 compute, fp32 gradient reduction)."""
    if not distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Gradients as views into DDP's reduction buckets: otherwise every gradient exists twice (its own
        # tensor and its bucket slot), a second fp32 model's worth of memory.
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


@contextmanager
def gathered(model):
    """Generation (on-policy sampling, the generation eval) under FSDP2: all-gather every block and the root
    once on entry and keep them gathered through every forward inside, instead of one all-gather of the whole
    model per forward, i.e. per generated token; reshard on exit. Inside, a forward makes no collective, so
    ranks may make different numbers of generate calls, each stopping when its own rows stop. Entry is
    collective (every rank enters together), exit is local.
    Memory: the whole model in the compute dtype (bf16, or fp32) on every rank while inside, next to the
    sharded fp32 master weights and optimizer state: ~14 GB at 7B in bf16.
    Exit restores wrap()'s settings (FSDP2's defaults): blocks reshard after each forward, the root does not;
    the root is resharded too, so its sharded parameters (the optimizer's) are the registered ones again.
    Single process and DDP: nothing to do."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield model
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)          # every unit (recurse=True)
    for handle in [m.unshard(async_op=True) for m in units]:   # all issued first: the gathers overlap
        handle.wait()
    try:
        yield model
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.reshard()


def unwrap(model):
    """The Transformer inside DDP (FSDP2 shards in place: the model is its own module)."""
    return getattr(model, "module", model)


def no_sync(model, sync: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-step of an accumulation. FSDP2: sync on
    every micro-step. Its "no sync" keeps every block's *unsharded* fp32 gradient alive until the last
    micro-step (the full model's worth per rank: 29 GB at 7B); reduce-scattering each micro-step instead
    accumulates into the sharded gradient, 1/world of that, for one extra reduce-scatter per micro-step."""
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2
        return nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()
