"""What a new user meets first, through the real command line: --eval_only standing alone, inputs checked before
anything is written, one-line errors with exit code 2, prints that say what applies."""
import json
import os
import subprocess
import sys

from test_train import ROOT

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
SMALL = ["--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--hidden_dim=64", "--progress=false",
         "--log_every=1", "--warmup_ratio=0"]
CHAT, HELD_OUT = os.path.join(ROOT, "examples", "chat.jsonl"), os.path.join(ROOT, "examples", "chat_eval.jsonl")


def train_py(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def last_json(stdout, key):
    return json.loads([l for l in stdout.splitlines() if l.startswith("{" + json.dumps(key))][-1])


def test_eval_only_needs_no_training_set_and_equals_the_end_of_training(tmp_path, tok_path):
    run = tmp_path / "run"
    five = f"--eval_data={HELD_OUT}:5"
    bar_on = [a for a in SMALL if a != "--progress=false"]      # the default: bars, but only on a terminal
    p = train_py(bar_on + [f"--tokenizer={tok_path}", f"--data={CHAT}", five, "--micro_batch_size=8", "--max_steps=2",
                           f"--out_dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tokenizing" not in p.stderr and "it/s" not in p.stderr     # a redirected log holds no bar redraws
    trained = last_json(p.stdout, "final_train_loss")
    work = tmp_path / "cwd"       # the default --out_dir would be work/out: eval-only must not create it
    work.mkdir()
    # no --data, and a default micro-batch (32) that 5 rows do not fill
    p = train_py(["--eval_only", f"--init_from={run}", five, "--progress=false"], work)
    assert p.returncode == 0, p.stderr[-2000:]
    alone = last_json(p.stdout, "evaluated")
    assert {k: v for k, v in trained.items() if k.startswith("eval/")} == \
        {k: v for k, v in alone.items() if k.startswith("eval/")} and "eval/loss" in alone
    assert "5 eval examples" in p.stdout and "demo" not in p.stdout
    assert os.listdir(work) == []
    # a training file alone is nothing to evaluate: one line, exit 2, nothing written
    p = train_py(["--eval_only", f"--init_from={run}", f"--data={CHAT}"], work)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--eval_data" in p.stderr, p.stderr
    # neither: the demo's held-out rows, and it says so
    p = train_py(["--eval_only", f"--init_from={run}", "--n_eval=8", "--gen_eval=0", "--progress=false"], work)
    assert p.returncode == 0 and "evaluating the built-in demo task's 8 held-out rows" in p.stdout, p.stderr[-2000:]
    assert os.listdir(work) == []


def refused(args, capsys):
    """train.py's command line run in this process: it must end with one line and exit code 2."""
    import pytest
    import train
    with pytest.raises(SystemExit) as e:
        train.cli(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "Traceback" not in err, (e.value.code, err)
    return err


def test_every_input_is_checked_before_anything_is_written(tmp_path, tok_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(l) for l in open(CHAT)][:4]
    rows[2] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    base = SMALL + [f"--out_dir={out}", "--max_steps=1", "--vocab_size=300"]
    for tok in ([], [f"--tokenizer={tok_path}"]):       # a tokenizer trained on the data, or a given one
        err = refused(base + tok + [f"--data={bad}", f"--eval_data={HELD_OUT}"], capsys)
        assert f"{bad}:3: messages[1] has no 'content' field" in err
        err = refused(base + tok + [f"--data={CHAT}", f"--eval_data={bad}"], capsys)
        assert f"{bad}:3: messages[1] has no 'content' field" in err
        err = refused(base + tok + [f"--data={CHAT}", f"--eval_data={tmp_path / 'typo.jsonl'}"], capsys)
        assert "typo.jsonl: no such file" in err
        err = refused(base + tok + [f"--data={CHAT}", "--loss=dpo"], capsys)
        assert f"{CHAT}:1: a pairwise objective needs 'chosen' and 'rejected' fields" in err
        assert not out.exists()
    # SFT-style objectives on preference rows: said once
    import train
    prefs = os.path.join(ROOT, "examples", "prefs.jsonl")
    train.cli(SMALL + [f"--tokenizer={tok_path}", f"--data={prefs}", "--loss=sft", "--dry_run", "--micro_batch_size=4"])
    assert capsys.readouterr().out.count("trains on their chosen answers") == 1


def test_every_preset_writes_into_its_own_out_dir():
    import glob
    dirs = {p: json.load(open(p)).get("out_dir") for p in glob.glob(os.path.join(ROOT, "configs", "*.json"))}
    assert all(d and d != "out" for d in dirs.values()), dirs       # never the demo's out/
    assert len(set(dirs.values())) == len(dirs), dirs


def test_one_line_errors_and_helps_that_say_what_they_do():
    def script(name, args):     # a file (train.py) or a module (-m infra.memplan)
        cmd = ["-m", name[3:]] if name.startswith("-m ") else [os.path.join(ROOT, name)]
        return subprocess.run([sys.executable] + cmd + args, env=ENV, capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
    p = script("train.py", ["--lrr=1"])
    assert p.returncode == 2 and p.stderr.strip() == \
        "train.py: error: unrecognized arguments: --lrr=1 (did you mean --lr?); see --help"
    p = script("-m infra.memplan", ["--help"])
    assert p.returncode == 0 and "Mistral-7B" in p.stdout and "|" not in p.stdout       # help, not the table
    p = script("bench.py", ["--help"])
    assert p.returncode == 0 and "--gpu" in p.stdout and "torch CPU threads" in p.stdout


def test_start_up_prints_what_applies(tmp_path, tok_path, capsys):
    import train
    from model import ModelArgs
    shape = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=320)
    shown = train.shown_config(train.parse_config(["--loss=dpo", f"--data={CHAT}"]), shape)
    assert (shown["dim"], shown["n_layers"], shown["vocab_size"]) == (64, 3, 320)      # the model's, not defaults
    assert not {"lam", "gamma", "n_train", "n_eval", "gen_eval", "orpo_beta", "n_samples"} & set(shown)
    assert {"beta", "ref"} <= set(shown)
    shown = train.shown_config(train.parse_config([]), shape)
    assert {"lam", "n_train", "gen_eval"} <= set(shown) and "beta" not in shown
    # DPO's metrics carry no IFT lambda
    train.main(SMALL + [f"--tokenizer={tok_path}", "--loss=dpo", "--n_train=16", "--n_eval=4", "--gen_eval=0",
                        "--micro_batch_size=8", "--max_steps=1", f"--out_dir={tmp_path / 'dpo'}"])
    recs = [json.loads(l) for l in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert recs and all("lam" not in r for r in recs)
    # a trained tokenizer announces its real size (--vocab_size is an upper bound)
    capsys.readouterr()
    plan = train.cli([f"--data={CHAT}", "--vocab_size=2000", "--dry_run", "--micro_batch_size=4",
                      f"--out_dir={tmp_path / 'tok'}"])
    out = capsys.readouterr().out
    assert "at most 2000 pieces" in out and f"tokenizer: {plan['tokenizer_vocab']} pieces" in out
    assert plan["tokenizer_vocab"] < 2000


def test_data_cache_follows_the_umask(tmp_path, tok_path):
    import glob
    import stat
    import data
    from infra import tokcache
    import tokenizer
    old = os.umask(0o022)
    try:
        tokcache.load(data.load_sft, CHAT, tokenizer.Tokenizer(tok_path), str(tmp_path / "cache"), 0, False, max_length=256)
    finally:
        os.umask(old)
    paths = glob.glob(str(tmp_path / "cache" / "*")) + glob.glob(str(tmp_path / "cache" / "*" / "*"))
    assert len(paths) >= 3
    for p in paths:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o044 == 0o044 and (not os.path.isdir(p) or mode & 0o011 == 0o011), (p, oct(mode))


def test_dry_run_of_a_recipe_needs_no_weights(tmp_path, tok_path, capsys):
    """config.json and the tokenizer are all --dry_run reads of the model directory (a 7B recipe's 14 GB of
    safetensors need not be there), and it writes nothing."""
    import shutil
    import torch
    from infra import hf_io
    import train
    from model import ModelArgs
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32000)
    (model_dir / "config.json").write_text(json.dumps(hf_io.hf_config(args, torch.bfloat16)))
    shutil.copy(tok_path, model_dir / "tokenizer.model")
    plan = train.cli(["--config=" + os.path.join(ROOT, "configs", "s2_sftbeta_ift.json"), f"--init_from={model_dir}",
                      f"--data={CHAT}", "--split=", "--micro_batch_size=2", "--grad_accum=1", "--dry_run",
                      f"--out_dir={tmp_path / 'out'}"])
    assert plan["train_examples"] == 34 and plan["tokenizer_vocab"] == 320
    assert '"dim": 4096' in capsys.readouterr().out          # the shape from config.json
    assert not (tmp_path / "out").exists()


def test_tensorboard_gets_the_records_of_metrics_jsonl(tmp_path, tok_path, capsys):
    import importlib.util
    import glob
    import pytest
    import train
    if importlib.util.find_spec("wandb") is None:     # a logger without its package: one line, nothing written
        err = refused(SMALL + [f"--tokenizer={tok_path}", "--log_to=wandb", f"--out_dir={tmp_path / 'x'}"], capsys)
        assert "--log_to=wandb needs the wandb package: pip install wandb" in err and not (tmp_path / "x").exists()
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train.main(SMALL + [f"--tokenizer={tok_path}", "--n_train=32", "--n_eval=8", "--gen_eval=0", "--micro_batch_size=8",
                        "--max_steps=4", "--eval_every=2", "--log_to=tensorboard", f"--out_dir={out}"])
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    want = {}
    for r in recs:
        for k, v in r.items():
            if k != "step":
                want.setdefault(k, []).append((r["step"], v))
    (events,) = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want) and "eval/loss" in want and "loss" in want
    import numpy as np
    for k, series in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(k)]
        assert [s for s, _ in got] == [s for s, _ in series], k
        assert all(g == np.float32(v) for (_, g), (_, v) in zip(got, series)), k     # event files hold float32
