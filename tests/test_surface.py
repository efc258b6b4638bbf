"""What a researcher touches first: a guarded out_dir, early checks, readable files, sample.py, --eval_only,
the README's examples section, and a repository that cites nothing outside itself."""
import glob
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

import tokenizer
import train
from generate import generate
from infra import checkpoint, hf_io
from model import ModelArgs, Transformer
from test_train import ROOT, TINY

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def script(name, args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, name)] + args, env=ENV, capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, tok_path):
    """An out_dir with an older, longer run: refused without --resume/--overwrite; with --overwrite the
    old checkpoints go, the newest checkpoint is this run's and metrics.jsonl holds this run only."""
    common = TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--micro_batch_size=8", f"--out_dir={tmp_path}"]
    train.main(common + ["--max_steps=4", "--save_every=2", "--keep_last=5"])
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["ckpt-000002", "ckpt-000004"]
    with pytest.raises(SystemExit, match="already holds a run .*ckpt-000004.*--resume.*--overwrite"):
        train.main(common + ["--max_steps=1"])
    s = train.main(common + ["--max_steps=1", "--overwrite", "--keep_last=1"])
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["ckpt-000001"]
    assert s["checkpoint"].endswith("ckpt-000001") and os.path.isdir(s["checkpoint"])
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path, tok_path):
    """A stray checkpoint with a later step number (copied in, or left by another run) must not make
    keep_last delete the checkpoint this run has just written."""
    import shutil
    common = TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--micro_batch_size=8", f"--out_dir={tmp_path}"]
    train.main(common + ["--max_steps=2"])
    shutil.copytree(tmp_path / "ckpt-000002", tmp_path / "ckpt-000090")
    s = train.main(common + ["--max_steps=4", "--resume", "--keep_last=1"])
    assert s["checkpoint"].endswith("ckpt-000004") and os.path.isdir(s["checkpoint"])
    assert [os.path.basename(c) for c in checkpoint.list_checkpoints(str(tmp_path))] == ["ckpt-000004"]


def test_resume_reports_refuses_and_finishes_cleanly(tmp_path, tok_path, capsys):
    common = TINY + [f"--tokenizer={tok_path}", "--micro_batch_size=8", f"--out_dir={tmp_path}"]
    train.main(common + ["--resume", "--loss=sft", "--max_steps=2"])
    assert "no checkpoint in" in capsys.readouterr().out                       # said, not silent
    with pytest.raises(SystemExit, match="trained with --loss=sft, this run asks for --loss=ift"):
        train.main(common + ["--resume=true", "--loss=ift", "--max_steps=3"])
    train.main(common + ["--resume", "--loss=sft", "--max_steps=3", "--lr=1e-2"])
    out = capsys.readouterr().out
    assert "resumed" in out and "step 2 of 3" in out and "lr 0.003 -> 0.01" in out
    s = train.main(common + ["--resume", "--loss=sft", "--max_steps=3", "--lr=1e-2"])
    assert s["finished"] and "final_train_loss" not in s and "nothing to train" in capsys.readouterr().out


def test_bad_settings_fail_before_any_reference_log_prob(tmp_path, tok_path):
    p = script("train.py", TINY + [f"--tokenizer={tok_path}", "--loss=kto", "--micro_batch_size=1",
                                   f"--out_dir={tmp_path / 'kto'}"])
    assert p.returncode != 0 and "--micro_batch_size >= 2" in p.stderr and "got 1" in p.stderr
    assert "Traceback" not in p.stderr and not glob.glob(str(tmp_path / "kto" / "ref_logps-*"))
    # a model whose embedding is smaller than the tokenizer (ids past it would crash mid-run)
    ck = tmp_path / "small"
    hf_io.save_model(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                                      vocab_size=100)).init_weights(seed=0), str(ck))
    p = script("train.py", TINY + [f"--tokenizer={tok_path}", "--loss=dpo", f"--init_from={ck}",
                                   f"--out_dir={tmp_path / 'dpo'}"])
    n = tokenizer.Tokenizer(tok_path).vocab_size
    assert p.returncode != 0 and f"{n} pieces" in p.stderr and "vocab_size 100" in p.stderr
    assert "Traceback" not in p.stderr and not glob.glob(str(tmp_path / "dpo" / "ref_logps-*"))


def test_checkpoint_files_are_readable_by_others(tmp_path, tok_path):
    old = os.umask(0o022)
    try:
        s = train.main(TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--max_steps=1", "--micro_batch_size=8",
                               f"--out_dir={tmp_path}"])
    finally:
        os.umask(old)
    paths = [s["checkpoint"]] + glob.glob(os.path.join(s["checkpoint"], "*"))
    assert len(paths) > 3
    for p in paths:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o044 == 0o044, (p, oct(mode))      # group and others can read
        if os.path.isdir(p):
            assert mode & 0o011 == 0o011, (p, oct(mode))


def test_sample_and_eval_only_reproduce_the_run(tmp_path):
    out = tmp_path / "demo"
    demo = ["--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--hidden_dim=128", "--n_train=256",
            "--n_eval=32", "--micro_batch_size=16", "--gen_eval=8", "--progress=false", "--vocab_size=320",
            "--loss=dpo", "--max_steps=6", f"--out_dir={out}"]
    s = train.main(demo)
    again = train.main(demo + ["--eval_only", "--resume"])      # the run's own reference and data
    assert again["evaluated"] == s["checkpoint"]
    for k in ("eval/loss", "eval/rewards/margin", "heldout_exact_match"):
        assert again[k] == pytest.approx(s[k], abs=1e-6), k
    assert not glob.glob(str(out / "ckpt-*"))[1:]            # wrote no checkpoint
    p = script("sample.py", ["--model", str(out), "--prompt", "Add 12 and 30.", "--max_new_tokens", "16"])
    assert p.returncode == 0, p.stderr
    tok = tokenizer.Tokenizer(os.path.join(s["checkpoint"], "tokenizer.model"))
    m = hf_io.load_model(s["checkpoint"]).eval()
    prompt = tokenizer.render_chat(tok, [{"role": "user", "content": "Add 12 and 30."}], add_generation_prompt=True)[0]
    want = tok.decode(generate(m, [prompt], 16, stop_ids=[tok.eos_id])[0])
    assert p.stdout.endswith(f"--- 'Add 12 and 30.'\n{want}\n")      # the checkpoint's own greedy answer
    p = script("sample.py", ["--model", str(tmp_path / "nope")])
    assert p.returncode != 0 and "no such directory" in p.stderr and "Traceback" not in p.stderr
    # eval_gen: a run directory means its newest checkpoint, and results land beside that checkpoint
    arc = os.path.join(ROOT, "tests", "fixtures", "arc_ai2.jsonl")
    p = script("eval_gen.py", ["--model", str(out), "--task", "arc_gen", "--data", arc, "--max_new_tokens", "4"])
    assert p.returncode == 0, p.stderr
    assert os.path.isfile(os.path.join(s["checkpoint"], "eval", "arc_gen.jsonl"))
    p = script("eval_gen.py", ["--model", str(tmp_path / "nope"), "--task", "arc_gen", "--data", arc])
    assert p.returncode != 0 and "no such directory" in p.stderr and "Traceback" not in p.stderr


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    body = text.split(f"## {title}")[1].split("\n## ")[0]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", body, re.S)]


def test_the_examples_section_runs_as_written(tmp_path):
    """Every command of README's "Train on your own data", run from a copy of the repo's examples/."""
    import shutil
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    cmds = [l for block in readme_section("Train on your own data") for l in block.splitlines()
            if l.strip() and not l.lstrip().startswith("#")]
    assert len(cmds) >= 3
    for c in cmds:
        argv = shlex.split(c)
        assert argv[0] == "python"
        p = script(argv[1], argv[2:], cwd=tmp_path, timeout=600)
        assert p.returncode == 0, (c, p.stdout[-2000:], p.stderr[-2000:])
    assert checkpoint.list_checkpoints(str(tmp_path / "out" / "mychat")) and checkpoint.list_checkpoints(str(tmp_path / "out" / "mydpo"))


def test_nothing_outside_the_repository_is_cited():
    """Readers have this repository only: no internal contract files, no sibling folders."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    here = os.path.basename(__file__)
    bad = re.compile(r"\bSPEC(_ONPOLICY)?\b|\.\./shared|/work/")
    hits = [f"{f}:{i}" for f in tracked if f.endswith((".py", ".md", ".json", ".txt", ".cfg", ".toml")) and f != f"tests/{here}"
            for i, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8", errors="replace"), 1)
            if bad.search(line)]
    assert not hits, hits
