"""Memory and start-up at scale, on CPU with 2 gloo ranks: sharded gradients during FSDP2 accumulation,
sharded loading from safetensors, the sharded resumable checkpoint."""
import json
import os
import textwrap

import torch

from test_distributed import GUARD, ROOT, metrics, torchrun  # noqa: F401
from test_train import TINY, tok_path  # noqa: F401  (fixture)

# Counts every gradient a rank holds after a micro-step's backward: the sharded .grad (local part of the
# DTensor) and what FSDP2 keeps unsharded between micro-steps when gradient sync is off.
GRAD_BYTES = """
def grad_bytes(model):
    n = 0
    for p in model.parameters():
        if p.grad is not None:
            g = getattr(p.grad, "_local_tensor", p.grad)
            n += g.numel() * g.element_size()
    for m in model.modules():
        group = getattr(m, "_get_fsdp_state", None) and m._get_fsdp_state()._fsdp_param_group
        for fp in (group.fsdp_params if group else []):
            for g in (getattr(fp._unsharded_param, "grad", None) if hasattr(fp, "_unsharded_param") else None,
                      getattr(fp, "unsharded_accumulated_grad", None)):
                if g is not None:
                    n += g.numel() * g.element_size()
    return n
"""


def test_fsdp_accumulation_keeps_gradients_sharded(tmp_path, tok_path):
    script = tmp_path / "grads.py"
    script.write_text(textwrap.dedent(f"""
        import contextlib, json, sys
        sys.path.insert(0, {ROOT!r})
        import parallel, train
        """) + GRAD_BYTES + textwrap.dedent(f"""
        seen, inner = [], parallel.no_sync

        @contextlib.contextmanager
        def measured(model, sync):      # wraps the loop's backward: measure right after it
            with inner(model, sync):
                yield
            full = sum(p.numel() * 4 for p in model.parameters())
            seen.append(grad_bytes(model) / full)

        parallel.no_sync = measured
        train.main({TINY!r} + ["--tokenizer={tok_path}", "--loss=ift", "--max_steps=2", "--micro_batch_size=2",
                               "--grad_accum=4", "--parallel=fsdp", "--out_dir={tmp_path / 'out'}"])
        print("GRADS", json.dumps(seen))
    """))
    p = torchrun([str(script)])
    fractions = [json.loads(line.split(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("GRADS")]
    assert len(fractions) == 2 and all(len(f) == 8 for f in fractions)    # 2 ranks x 2 steps x 4 micro-steps
    # ~1/2 of one fp32 copy per rank on 2 ranks (FSDP2's "no sync" would hold a whole copy until the last one)
    assert max(max(f) for f in fractions) <= 0.6, fractions
    assert min(min(f) for f in fractions) > 0.3, fractions      # and the count does see the gradients


def test_sharded_load_never_holds_the_whole_model(tmp_path):
    """A 35M-parameter bf16 checkpoint (140 MB in fp32): under FSDP2 each of 2 ranks grows by its half in
    fp32 plus one tensor's slice, not by the whole model; its logits equal a full fp32 load's."""
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, hidden_dim=1536, vocab_size=8000,
                     sliding_window=None)
    ck, warm = str(tmp_path / "ck"), str(tmp_path / "warm")
    Transformer(args).init_weights(seed=0).save_pretrained(ck, dtype=torch.bfloat16)
    Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                          vocab_size=64)).init_weights(seed=0).save_pretrained(warm, dtype=torch.bfloat16)
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {ROOT!r})
        import parallel
        from model import Transformer
        rank, _, world, _ = parallel.setup(120)
        parallel.load_sharded({warm!r}, torch.device("cpu"), bf16=False)   # imports, one-time set-up: not the load
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = parallel.load_sharded({ck!r}, torch.device("cpu"), bf16=False)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        full = sum(p.numel() * 4 for p in model.parameters())
        x = torch.arange(64).reshape(2, 32) * 37 % 8000
        with torch.no_grad():
            got = model(x)
        ref = Transformer.from_pretrained({ck!r}, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(x)
        print("LOAD", rank, grew / full, (got - want).abs().max().item())
    """))
    p = torchrun([str(script)], timeout=240)
    rows = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("LOAD")]
    assert len(rows) == 2, p.stdout
    for rank, frac, diff in rows:
        assert float(diff) <= 1e-5, (rank, diff)
        assert float(frac) < 0.75, (rank, frac)    # a full fp32 load alone is 1.0 (+ the bf16 file's pages)


def test_fsdp_run_from_a_checkpoint_loads_sharded_and_equals_one_process(tmp_path, tok_path):
    """DPO with a precomputed reference: the table's key is hashed from the shards (every rank agrees)."""
    import train
    from model import ModelArgs, Transformer
    from test_train import max_diff, weights
    ck = str(tmp_path / "init")
    Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=320,
                          sliding_window=None)).init_weights(seed=3).save_pretrained(ck)
    common = TINY + [f"--tokenizer={tok_path}", f"--init_from={ck}", "--loss=dpo", "--max_steps=2", "--eval_every=2"]
    train.main(common + [f"--out_dir={tmp_path / 'one'}", "--micro_batch_size=8"])
    p = torchrun([GUARD] + common + [f"--out_dir={tmp_path / 'two'}", "--micro_batch_size=4", "--parallel=fsdp"])
    assert "model load (sharded, each rank its part)" in p.stdout
    r1, r2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert abs(r1[0]["loss"] - r2[0]["loss"]) < 1e-6 and "eval/loss" in r2[-1]
    assert abs(r1[-1]["eval/loss"] - r2[-1]["eval/loss"]) < 1e-6
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-4
