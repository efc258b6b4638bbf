"""The torchrun path as a GPU run takes it, on CPU (gloo): 2-process DDP / FSDP2 == one process for the on-policy
objectives, the demo's generation eval and sharded held-out eval; bf16 reference log-probs that equal the
policy's at step 0; exact resume of sampled runs; refused schedule changes; every collective on the training
device (tests/collective_guard.py wraps every 2-process run here)."""
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import train
from conftest import teardown_abort_only
from infra import checkpoint
from test_train import ROOT, TINY, max_diff, weights

GUARD = os.path.join(ROOT, "tests", "collective_guard.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def torchrun(script_and_args, nproc=2, timeout=300, marker='{"final_train_loss"'):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + script_and_args
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    ok = p.returncode == 0 or teardown_abort_only(p, marker)
    assert ok, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def single(args, timeout=300):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, env=ENV, capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def summary(p):
    return json.loads([l for l in p.stdout.splitlines() if l.startswith('{"final_train_loss"')][-1])


def metrics(out_dir):
    return [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]


# n_eval=12 with micro-batch 4 gives 3 eval batches: rank 1 runs a dummy one (equal FSDP2 forwards);
# gen_eval=6 is one generate call: rank 1 again runs a dummy. 2 samples x 4 prompts = 8 rows per rank,
# 3 rows per generate call.
SAMPLED = ["--max_steps=2", "--onpolicy_every=1", "--n_samples=2", "--max_new_tokens=5", "--sample_batch_size=3",
           "--n_eval=12", "--eval_every=2", "--gen_eval=6", "--reward=demo", "--pair_threshold=0"]
_single_runs = {}


@pytest.mark.parametrize("parallel,loss,sampling", [
    ("fsdp", "sft", "onpolicy"), ("fsdp", "dpo", "onpolicy"), ("fsdp", "reinforce", "onpolicy"),
    ("ddp", "sft", "onpolicy"), ("ddp", "dpo", "offline"), ("ddp", "reinforce", "onpolicy")])
def test_two_process_sampled_run_equals_single_process(tmp_path_factory, tok_path, parallel, loss, sampling):
    common = TINY + SAMPLED + [f"--tokenizer={tok_path}", f"--loss={loss}", f"--sampling={sampling}"]
    if (loss, sampling) not in _single_runs:
        out = tmp_path_factory.mktemp("one")
        _single_runs[loss, sampling] = out, summary(single(common + [f"--out_dir={out}", "--micro_batch_size=8"]))
    one, s1 = _single_runs[loss, sampling]
    two = tmp_path_factory.mktemp("two")
    s2 = summary(torchrun([GUARD] + common + [f"--out_dir={two}", "--micro_batch_size=4", f"--parallel={parallel}"]))
    r1, r2 = metrics(one), metrics(two)
    assert [sorted(r) for r in r1] == [sorted(r) for r in r2] and any("eval/loss" in r for r in r1)
    for x, y in zip(r1, r2):
        for k in ("loss", "reward_mean", "eval/loss"):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-6, (k, x[k], y[k])
    assert s1["heldout_exact_match"] == s2["heldout_exact_match"]      # sharded generation eval
    assert abs(s1["eval/loss"] - s2["eval/loss"]) < 1e-6                # sharded held-out eval
    assert max_diff(weights(one), weights(two)) < (1e-4 if loss == "dpo" else 1e-5)


def test_fsdp_sampling_gathers_once_per_round_and_ranks_may_sample_unequally(tmp_path, tok_path):
    """A sampling round under FSDP2 all-gathers each unit (2 blocks + root) once, however many tokens it
    generates (4 or 16 here; gathering per forward would grow with them), and makes no other collective
    but the reward statistics. Rank 0 samples 4 prompts (4 generate calls of 2 rows), rank 1 one prompt
    (1 call): with any collective left inside generate the ranks would fall out of step and hang (here: time
    out after 60 s). Samples equal the unsharded model's, and afterwards the registered parameters are the
    sharded ones again (the optimizer's)."""
    script = tmp_path / "uneven.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch, torch.distributed as dist
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
        import collective_guard
        collective_guard.install()
        import data, onpolicy, tokenizer, train
        from infra import parallel
        from torch.distributed.tensor import DTensor
        calls = []
        def counted(name, fn):
            def call(*a, **kw):
                calls.append(name)
                return fn(*a, **kw)
            return call
        for name in collective_guard.COLLECTIVES:
            if hasattr(dist, name):        # FSDP2 calls all_gather_into_tensor (torch 2.11) or all_gather_single
                setattr(dist, name, counted(name, getattr(dist, name)))
        rank, _, world, _ = parallel.setup(60)
        tok, cpu = tokenizer.Tokenizer({tok_path!r}), torch.device("cpu")
        ex, _ = data.load_sft(data.synthetic_task(6, 0), tok)
        mine = [0, 1, 2, 3] if rank == 0 else [4]
        per_round = {{}}
        for n_new in (4, 16):
            cfg = train.parse_config({TINY!r} + ["--loss=sft", "--onpolicy_every=1", "--n_samples=2",
                                                 f"--max_new_tokens={{n_new}}", "--sample_batch_size=2"])
            model = train.build_model(cfg, tok, cpu)
            ref = onpolicy.Sampler(cfg, tok, ex, rank, world)
            ref.refresh(model, 0, range(5), cpu)                 # unsharded: what every prompt must get
            parallel.wrap(model, "fsdp", cpu, False, True)
            s = onpolicy.Sampler(cfg, tok, ex, rank, world)
            calls.clear()
            s.refresh(model, 0, mine, cpu)
            per_round[n_new] = list(calls)
            assert all(s.samples[i] == ref.samples[i] for i in mine), (s.samples, ref.samples)
            assert max(len(o) for i in mine for o in s.samples[i][0]) == n_new   # some row ran to the end
            assert all(isinstance(p, DTensor) for p in model.parameters())
        with open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w") as f:      # two ranks' prints may share a line
            json.dump(per_round, f)
        print("sampled", rank, flush=True)
        parallel.shutdown()
    """))
    torchrun([str(script)], timeout=120, marker="sampled 1")
    for rank in (0, 1):
        per_round = json.load(open(tmp_path / f"rank{rank}.json"))
        short, long = per_round["4"], per_round["16"]
        assert short == long, (short, long)
        gathers = [c for c in short if c.startswith("all_gather")]
        assert 0 < len(gathers) <= 3 and [c for c in short if c not in gathers] == ["all_reduce"], short


def test_guard_catches_a_host_tensor_in_a_collective():
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        import collective_guard; collective_guard.install()
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        dist.all_reduce(torch.ones(2, device="cpu"))          # made on the training device: fine
        try:
            dist.all_reduce(torch.tensor([1.0, 2.0], dtype=torch.float64))   # the old onpolicy.py pattern
        except RuntimeError as e:
            print("caught:", e)
    """)
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "caught: torch.distributed.all_reduce got a tensor created without device=" in p.stdout


def _step0(rec):
    return {k: v for k, v in rec.items() if k.startswith("rewards/") and k != "rewards/accuracy" or k == "kl"}


F32_LN2 = torch.tensor(math.log(2), dtype=torch.float32).item()


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto"])
def test_bf16_reference_equals_policy_at_step_0(tmp_path, tok_path, loss):
    for ref in ("precompute", "online"):
        train.main(TINY + [f"--tokenizer={tok_path}", f"--loss={loss}", f"--ref={ref}", "--precision=bf16",
                           "--max_steps=1", "--micro_batch_size=8", f"--out_dir={tmp_path / ref}"])
        rec = metrics(tmp_path / ref)[0]
        assert _step0(rec) and all(v == 0.0 for v in _step0(rec).values()), (ref, rec)
        if loss == "dpo":
            assert rec["loss"] == F32_LN2, (ref, rec["loss"])


@pytest.mark.parametrize("parallel,loss,ref", [("fsdp", "dpo", "precompute"), ("fsdp", "kto", "online"),
                                               ("ddp", "dpo", "online"), ("ddp", "kto", "precompute")])
def test_bf16_reference_equals_policy_at_step_0_two_processes(tmp_path, tok_path, parallel, loss, ref):
    torchrun([GUARD] + TINY + [f"--tokenizer={tok_path}", f"--loss={loss}", f"--ref={ref}", "--precision=bf16",
                               "--max_steps=1", "--micro_batch_size=4", f"--parallel={parallel}",
                               f"--out_dir={tmp_path}"])
    rec = metrics(tmp_path)[0]
    assert _step0(rec) and all(v == 0.0 for v in _step0(rec).values()), rec
    if loss == "dpo":
        assert rec["loss"] == F32_LN2, rec["loss"]


@pytest.mark.parametrize("loss,sampling", [("reinforce", "onpolicy"), ("dpo", "offline")])
def test_resume_of_a_sampled_run_is_bit_identical(tmp_path, tok_path, loss, sampling):
    """Checkpoint at step 3 lies inside an on-policy round (samples drawn at step 2): the resumed run must
    train on those samples and that baseline; the offline arm on the initial policy's samples."""
    common = TINY + [f"--tokenizer={tok_path}", f"--loss={loss}", f"--sampling={sampling}", "--onpolicy_every=2",
                     "--n_samples=3", "--max_new_tokens=5", "--reward=demo", "--pair_threshold=0",
                     "--micro_batch_size=8", "--max_steps=6", "--save_every=3"]
    full, cut = run_and_resume_from_step_3(common, tmp_path)
    assert [r["loss"] for r in metrics(full)] == [r["loss"] for r in metrics(cut)]


def run_and_resume_from_step_3(common, tmp_path):
    """A 6-step run saving every 3 steps, and a copy of it resumed from step 3 as if killed after writing that
    checkpoint (its later records dropped): (full, resumed) directories, their final weights checked equal."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(common + [f"--out_dir={full}"])
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "ckpt-000006")
    with open(cut / "metrics.jsonl") as f:
        kept = [l for l in f if json.loads(l)["step"] <= 3]
    open(cut / "metrics.jsonl", "w").writelines(kept)
    train.main(common + [f"--out_dir={cut}", "--resume=true"])
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    return full, cut


def test_resume_refuses_another_batch_schedule(tmp_path, tok_path):
    common = TINY + [f"--tokenizer={tok_path}", "--loss=sft", f"--out_dir={tmp_path}", "--max_steps=2"]
    train.main(common + ["--micro_batch_size=8"])
    with pytest.raises(SystemExit, match=r"micro_batch_size 8 -> 4"):
        train.main(common + ["--micro_batch_size=4", "--max_steps=4", "--resume=true"])
    with pytest.raises(SystemExit, match=r"grad_accum 1 -> 2"):
        train.main(common + ["--micro_batch_size=8", "--grad_accum=2", "--max_steps=4", "--resume=true"])
    ck = checkpoint.list_checkpoints(str(tmp_path))[-1]
    st = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)
    torch.save({**st, "world_size": 2}, os.path.join(ck, "trainer_state.pt"))   # as if written by 2 ranks
    with pytest.raises(SystemExit, match=r"world_size 2 -> 1"):
        train.main(common + ["--micro_batch_size=8", "--max_steps=4", "--resume=true"])


def test_torchrun_with_one_process_takes_the_distributed_path(tmp_path, tok_path):
    """One GPU under torchrun must exercise NCCL and the FSDP2 wrapping, not the single-process shortcut."""
    p = torchrun([GUARD] + TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--max_steps=1", "--micro_batch_size=8",
                                   "--parallel=fsdp", f"--out_dir={tmp_path}"], nproc=1)
    assert "world 1 (fsdp)" in p.stdout
