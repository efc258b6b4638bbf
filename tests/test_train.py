"""train.py end to end at toy sizes: parallel equivalence, exact resume, checkpoints, reference cache."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import reference
import tokenizer
import train
from conftest import teardown_abort_only
from infra import atomic, checkpoint, hf_io
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--hidden_dim=64", "--n_train=64",
        "--n_eval=16", "--gen_eval=0", "--progress=false", "--log_every=1", "--lr=3e-3", "--warmup_ratio=0"]


def run(args, nproc=1, timeout=300, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + [os.path.join(ROOT, "train.py")] + args
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0 and not (nproc > 1 and teardown_abort_only(p, '{"final_train_loss"')):
        raise AssertionError(f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def weights(out_dir):
    ck = sorted(glob.glob(os.path.join(out_dir, "ckpt-*")))[-1]
    return load_file(os.path.join(ck, "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("parallel,loss,accum", [("ddp", "ift", 2), ("fsdp", "ift", 2), ("ddp", "dpo", 1)])
def test_two_process_run_equals_single_process(tmp_path, tok_path, parallel, loss, accum):
    common = TINY + [f"--tokenizer={tok_path}", f"--loss={loss}", "--max_steps=3", f"--parallel={parallel}",
                     f"--grad_accum={accum}"]   # accumulation: the all-reduce must run on the last micro-step only
    run(common + [f"--out_dir={tmp_path / 'one'}", "--micro_batch_size=8"])
    run(common + [f"--out_dir={tmp_path / 'two'}", "--micro_batch_size=4"], nproc=2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    init = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                                             vocab_size=320)).init_weights(seed=1337)
    moved = (a["model.norm.weight"] - init.norm.weight).abs().max().item()
    assert moved > 1e-4          # training did change the weights...
    losses = [[json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two")]
    assert len(losses[0]) == 3 and max(abs(x - y) for x, y in zip(*losses)) < 1e-6
    # ...identically in one process and in two. DPO's step-0 gradient is tiny (β·σ(0)·Δ), so Adam's
    # g/sqrt(v) turns rounding-level differences of the all-reduce into ~1e-5 weight differences.
    assert max_diff(a, b) < (1e-5 if loss == "ift" else 1e-4)


def test_sigkill_then_resume_is_bit_identical(tmp_path, tok_path):
    common = TINY + [f"--tokenizer={tok_path}", "--loss=ift", "--max_steps=8", "--save_every=2",
                     "--micro_batch_size=8", "--keep_last=10"]
    run(common + [f"--out_dir={tmp_path / 'ref'}"])
    out = tmp_path / "killed"
    sigkill_once_saved([sys.executable, os.path.join(ROOT, "train.py")] + common + [f"--out_dir={out}"], out)
    run(common + [f"--out_dir={out}", "--resume=true"])
    a, b = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def sigkill_once_saved(cmd, out, step=4, last=8):
    """Run `cmd` (a training run writing into `out`) and SIGKILL it as soon as its step-`step` checkpoint is
    complete, before the run reaches step `last`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.isfile(out / f"ckpt-{step:06d}" / "trainer_state.pt") and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.isdir(out / f"ckpt-{last:06d}"), "the run finished before it could be killed"


def test_interrupted_checkpoint_write_never_shadows_the_last_good_one(tmp_path):
    good = tmp_path / "ckpt-000002"
    atomic.write_dir(str(good), lambda d: open(os.path.join(d, "trainer_state.pt"), "w").write("good"))

    def dies(d):
        open(os.path.join(d, "trainer_state.pt"), "w").write("half")
        raise KeyboardInterrupt  # e.g. a signal while the weights are being written
    for path in (good, tmp_path / "ckpt-000004"):
        with pytest.raises(KeyboardInterrupt):
            atomic.write_dir(str(path), dies)
    assert checkpoint.list_checkpoints(str(tmp_path)) == [str(good)]
    assert open(good / "trainer_state.pt").read() == "good"
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000002"]


def test_precomputed_reference_equals_online_and_cache_is_keyed(tmp_path, tok_path):
    common = TINY + [f"--tokenizer={tok_path}", "--loss=dpo", "--max_steps=3", "--micro_batch_size=8",
                     "--eval_every=3"]
    run(common + [f"--out_dir={tmp_path / 'pre'}", "--ref=precompute"])
    run(common + [f"--out_dir={tmp_path / 'onl'}", "--ref=online"])
    recs = [[json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("pre", "onl")]
    assert abs(recs[0][0]["loss"] - math.log(2)) < 1e-6          # policy == reference at step 0
    for x, y in zip(*recs):
        for k in ("loss", "eval/loss"):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-5, k
    ev = [r["eval/loss"] for r in recs[0] if "eval/loss" in r]
    assert len(ev) == 1 and abs(ev[0] - math.log(2)) > 1e-4     # held-out loss against the real reference
    assert len(glob.glob(str(tmp_path / "pre" / "ref_logps-*.pt"))) == 2   # train and eval tables
    assert max_diff(weights(tmp_path / "pre"), weights(tmp_path / "onl")) < 1e-4  # Adam-amplified rounding
    # the fingerprint moves with the data and with the model
    cfg = train.parse_config(common)
    tok = tokenizer.Tokenizer(tok_path)
    ex, _ = data.load_pairs(data.synthetic_pairs(8, 0), tok, 1024, 512)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                                          vocab_size=320)).init_weights(seed=0)
    fp = lambda examples: reference.fingerprint(cfg, reference.data_fingerprint(tok, examples), m)
    f0 = fp(ex)
    assert fp(ex) == f0
    assert fp(ex[:-1]) != f0                                   # a changed dataset
    longer, _ = data.load_pairs(data.synthetic_pairs(8, 0), tok, 24, 12)
    assert fp(longer) != f0                                    # changed truncation lengths
    with torch.no_grad():
        m.layers[0].mlp.down_proj.weight[5, 5] += 1e-3
    assert fp(ex) != f0                                        # a changed model


def test_demo_end_to_end_and_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "demo"
    summary = train.main(["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--hidden_dim=128",
                          "--n_train=256", "--n_eval=32", "--max_steps=6", "--micro_batch_size=16",
                          "--gen_eval=8", "--progress=false", f"--out_dir={out}", "--vocab_size=320"])
    assert 0.0 <= summary["heldout_exact_match"] <= 1.0 and math.isfinite(summary["eval/loss"])
    ck = summary["checkpoint"]
    assert os.path.isfile(os.path.join(ck, "tokenizer.model"))
    ours = hf_io.load_model(ck).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(ck, attn_implementation="eager").eval()
    x = torch.randint(3, 320, (2, 30))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 6 and state["config"]["loss"] == "ift"
    assert state["global_batch"] == 16 and state["world_size"] == 1 and len(state["data_fingerprint"]) == 16


def test_bad_config_names_the_key(tmp_path, capsys):
    for args, msg in ((["--lrr=1"], "unrecognized arguments: --lrr=1"), (["--lr=fast"], "--lr: invalid float value: 'fast'"),
                      (["--loss=trpo"], "--loss: invalid choice: 'trpo'")):
        with pytest.raises(SystemExit):
            train.parse_config(args)
        assert msg in capsys.readouterr().err
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"gamma": "high"}))
    with pytest.raises(SystemExit, match=f"bad value 'high' for 'gamma' \\({preset}\\)"):
        train.parse_config([f"--config={preset}"])
    preset.write_text(json.dumps({"gama": 0.5}))
    with pytest.raises(SystemExit, match=f"unknown config key 'gama' \\({preset}\\)"):
        train.parse_config([f"--config={preset}"])


def test_command_line_styles_and_help():
    """--key value, --key=value, bare --flag; presets under the command line; --help lists every field."""
    cfg = train.parse_config(["--lr", "0.5", "--loss=sft", "--resume", "--progress=false", "--grad_accum", "3"])
    assert (cfg.lr, cfg.loss, cfg.resume, cfg.progress, cfg.grad_accum) == (0.5, "sft", True, False, 3)
    assert train.parse_config(["--resume=true"]).resume and not train.parse_config(["--resume=false"]).resume
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0
    import dataclasses
    for f in dataclasses.fields(train.Config):
        line = next(l for l in p.stdout.splitlines() if l.strip().startswith(f"--{f.name} "))
        assert "default" in p.stdout[p.stdout.index(line):][:400], f.name
    helps = train.flags.field_help(train.Config)
    assert all(helps[f.name] for f in dataclasses.fields(train.Config))     # every option says what it does


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tok_path):
    common = TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--micro_batch_size=8", f"--out_dir={tmp_path}"]
    run(common + ["--max_steps=2"])
    p = run(common + ["--max_steps=4", "--resume=true", "--lr=1e30", "--grad_clip=0"], check=False)
    assert p.returncode != 0 and "non-finite" in p.stderr + p.stdout
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["ckpt-000002"]
