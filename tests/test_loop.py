"""The training loop's GPU hygiene, checked on CPU: no host sync per metric and micro-step (they stall the
device queue), and activation checkpointing that changes memory, never results (DDP and FSDP2)."""
import collections
import os
import textwrap
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from test_distributed import torchrun
from test_train import ROOT, TINY

TRAIN_PY = os.path.join(ROOT, "train.py")


class HostReads(TorchDispatchMode):
    """Counts tensor -> Python scalar reads (aten._local_scalar_dense: float(), int(), bool(), .item()) whose
    innermost frame in this repository is train.py, i.e. the loop's own reads."""
    def __init__(self):
        super().__init__()
        self.lines = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT + os.sep)
                    and os.sep + "tests" + os.sep not in f.filename]
            if ours and ours[-1].filename == TRAIN_PY:
                self.lines[ours[-1].lineno] += 1
        return func(*args, **(kwargs or {}))


def test_loop_reads_metrics_once_per_log_step_not_per_micro_step(tmp_path, tok_path):
    """3 steps of 1 and of 4 micro-batches, one log line: the loop's host reads must not grow with the
    micro-batches (before: a float() per metric per micro-step, 4 x 5 of them per step at grad_accum 4)."""
    reads = {}
    for accum in (1, 4):
        with HostReads() as h:
            train.main(TINY + [f"--tokenizer={tok_path}", "--loss=ift", "--max_steps=3", "--micro_batch_size=4",
                               f"--grad_accum={accum}", "--log_every=100", f"--out_dir={tmp_path / str(accum)}"])
        reads[accum] = sum(h.lines.values())
    assert reads[4] == reads[1], reads


def test_activation_checkpointing_changes_no_loss_or_gradient_ddp_and_fsdp(tmp_path, tok_path):
    """Two ranks, IFT (two passes, the first without grad), two optimizer steps from one seed: losses and
    gradient norms with --grad_checkpointing equal those without, under DDP and FSDP2; and it really
    recomputes (each block starts its forward twice in the training pass)."""
    script = tmp_path / "ckpt.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        import data, tokenizer, train
        from infra import parallel
        rank, _, world, _ = parallel.setup(120)
        tok, cpu = tokenizer.Tokenizer({tok_path!r}), torch.device("cpu")
        ex, _ = data.load_sft(data.synthetic_task(16, 0), tok)
        res = {{}}
        for par in ("ddp", "fsdp"):
            for ckpt in (False, True):
                cfg = train.parse_config({TINY!r} + ["--loss=ift", f"--grad_checkpointing={{ckpt}}"])
                torch.manual_seed(0)
                model = train.build_model(cfg, tok, cpu)
                calls = []
                model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))   # recompute stops early: no post-hook
                model = parallel.wrap(model, par, cpu, False, True)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
                out = []
                for step in range(2):
                    idx = list(range(rank * 4 + step * 8, rank * 4 + step * 8 + 4))
                    batch = data.to_device(data.collate([ex[i] for i in idx], tok.pad_id), cpu)
                    calls.clear()
                    loss, _ = train.compute_loss(cfg, model, batch, None, cfg.lam)
                    loss.backward()
                    n_calls = len(calls)
                    g = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    g = g.full_tensor() if hasattr(g, "full_tensor") else g
                    out.append((float(loss), float(g), n_calls))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                res[par, ckpt] = out
        for par in ("ddp", "fsdp"):
            off, on = res[par, False], res[par, True]
            assert all(c == 2 for _, _, c in off) and all(c == 3 for _, _, c in on), (par, off, on)
            for (l0, g0, _), (l1, g1, _) in zip(off, on):
                assert abs(l0 - l1) <= 1e-6 * abs(l0) and abs(g0 - g1) <= 1e-6 * abs(g0), (par, off, on)
        print("checkpointing equal", rank, res)
    """))
    p = torchrun([str(script)], timeout=180, marker="checkpointing equal 1")
    assert p.stdout.count("checkpointing equal") == 2, p.stdout
