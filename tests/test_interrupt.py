"""Interrupts through the real command line: SIGINT/SIGTERM finish the step, save a checkpoint on every rank,
print the resume command and exit 130/143 without a traceback; the resumed run equals the uninterrupted one
bit for bit. A SIGKILL after a wall-time save (--save_every_min) resumes from that save."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from infra import checkpoint
from test_train import ROOT, TINY, sigkill_once_saved, weights

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
STEPS = 30
_reference = {}


def command(args, nproc):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return launch + [os.path.join(ROOT, "train.py")] + args


def finished_run(args, nproc):
    p = subprocess.run(command(args, nproc), env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert '{"final_train_loss"' in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def records(out_dir):
    """metrics.jsonl without the timing fields (the only values a resume may change)."""
    recs = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu", "mem_gb")} for r in recs]


def start_and_signal(args, nproc, signum, out_dir, whom="all", after_records=3):
    """Start a run, wait until it logged `after_records` steps, send `signum` (to the whole process group, as a
    terminal's Ctrl-C does, or to rank 1 only), return the finished process and its output."""
    p = subprocess.Popen(command(args, nproc), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    metrics, deadline = os.path.join(out_dir, "metrics.jsonl"), time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= after_records:
            break
        time.sleep(0.02)
    if whom == "rank1":
        os.kill(worker_pid(p.pid, rank=1), signum)
    else:
        os.killpg(p.pid, signum)
    out, err = p.communicate(timeout=240)
    return p.returncode, out, err


def worker_pid(agent_pid, rank):
    for child in open(f"/proc/{agent_pid}/task/{agent_pid}/children").read().split():
        env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


@pytest.mark.parametrize("nproc,signum,whom", [(1, signal.SIGINT, "all"), (1, signal.SIGTERM, "all"),
                                               (2, signal.SIGINT, "all"), (2, signal.SIGTERM, "rank1")])
def test_signal_saves_then_resume_is_bit_identical(tmp_path, tok_path, nproc, signum, whom):
    common = TINY + [f"--tokenizer={tok_path}", "--loss=ift", f"--max_steps={STEPS}", f"--micro_batch_size={8 // nproc}",
                     "--keep_last=10"]
    if nproc not in _reference:
        ref = tmp_path / "ref"
        finished_run(common + [f"--out_dir={ref}"], nproc)
        _reference[nproc] = records(ref), weights(ref)
    out = tmp_path / "stopped"
    args = common + [f"--out_dir={out}"]
    code, stdout, stderr = start_and_signal(args, nproc, signum, out, whom)
    assert code != 0
    if nproc == 1:                  # torchrun reports its workers' exit its own way
        assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    ours, _, launcher = stderr.partition("resume with: ")
    assert "Traceback" not in stdout + ours
    # torchrun's agent ends with a traceback of its own (SignalException or ChildFailedError): not the workers'
    assert "Traceback" not in launcher or (nproc > 1 and "torch/distributed/run.py" in launcher)
    saved = checkpoint.list_checkpoints(str(out))
    assert len(saved) == 1, (saved, stderr[-2000:])
    step = torch.load(os.path.join(saved[0], "trainer_state.pt"), weights_only=True)["step"]
    assert 3 <= step < STEPS
    assert f"stopped after step {step} of {STEPS}, saved {saved[0]}" in stderr
    resume = stderr.split("resume with: ")[1].splitlines()[0]
    assert resume.endswith("--resume") and f"--out_dir={out}" in resume
    finished_run(args + ["--resume"], nproc)
    ref_records, ref_weights = _reference[nproc]
    assert records(out) == ref_records
    w = weights(out)
    assert all(torch.equal(ref_weights[k], w[k]) for k in w)


def test_sigkill_after_wall_time_save_resumes_from_it(tmp_path, tok_path):
    common = TINY + [f"--tokenizer={tok_path}", "--loss=ift", "--max_steps=8", "--micro_batch_size=8",
                     "--keep_last=10", "--save_every_min=1e-6"]       # a save after every step
    ref = tmp_path / "ref"
    finished_run(common + [f"--out_dir={ref}"], 1)
    out = tmp_path / "killed"
    sigkill_once_saved(command(common + [f"--out_dir={out}"], 1), out)
    assert sorted(glob.glob(str(out / "ckpt-00000[1-4]"))) and os.path.isdir(out / "ckpt-000001")
    finished_run(common + [f"--out_dir={out}", "--resume"], 1)
    assert records(out) == records(ref)
    a, b = weights(ref), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_ctrl_c_exits_at_once_but_a_forwarded_duplicate_does_not(monkeypatch):
    from infra import interrupt
    exits = []
    monkeypatch.setattr(interrupt.os, "_exit", exits.append)
    clock = iter([100.0, 100.01, 102.0, 0.0])    # torchrun's forwarded copy 10 ms later, then a real second Ctrl-C
    monkeypatch.setattr(interrupt.time, "monotonic", lambda: next(clock))
    stop = interrupt.StopRequest(verbose=False)
    stop.armed = True
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT and exits == []
    stop._handle(signal.SIGINT, None)
    assert exits == [130]
    with pytest.raises(KeyboardInterrupt):      # before the loop: nothing to save, the run just ends
        interrupt.StopRequest(verbose=False)._handle(signal.SIGINT, None)


def test_resume_command_drops_overwrite_and_adds_resume(monkeypatch):
    from infra import interrupt
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert interrupt.resume_command(["--lr=1e-3", "--overwrite", "--resume", "false", "--data", "a b.jsonl"]) == \
        "python train.py --lr=1e-3 --data 'a b.jsonl' --resume"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert interrupt.resume_command(["--overwrite=true"]) == "torchrun --nproc_per_node=8 train.py --resume"
