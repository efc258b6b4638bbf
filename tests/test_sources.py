"""Reproducing the paper from the files users have: --data sources (shard directories, globs,
mixtures with row caps), the authors' data conventions, the recipes in configs/, and user errors
that come out as one line naming the file. Fixtures are tiny and built once per module."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import reference
import tokenizer
import train
from infra import hf_io
from infra.hf_io import CheckpointError
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


def write_jsonl(path, rows):
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rows = data.synthetic_task(200, 0) + data.synthetic_pairs(50, 1)
    return tokenizer.train_tokenizer(data.corpus_text(rows), str(tmp_path_factory.mktemp("tok") / "tok"), 320)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """chat rows a (5) and b (4), their concatenation, a tiny checkpoint fitting tok, and a training file."""
    d = tmp_path_factory.mktemp("src")
    rows = data.synthetic_task(9, 3)
    ckpt = str(d / "ckpt")
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=40,
                     vocab_size=tok.vocab_size, sliding_window=None, max_position_embeddings=256)
    hf_io.save_model(Transformer(args).init_weights(std=0.02, seed=0), ckpt, extra_files={"tokenizer.model": tok.path})
    return {"dir": d, "rows": rows, "a": write_jsonl(d / "a.jsonl", rows[:5]), "b": write_jsonl(d / "b.jsonl", rows[5:]),
            "all": write_jsonl(d / "all.jsonl", rows), "ckpt": ckpt,
            "train": write_jsonl(d / "train.jsonl", data.synthetic_task(16, 4)), "vocab": tok.vocab_size}


# ---------------------------------------------------------------------------- sources
def test_parquet_shard_directory_equals_one_file(tmp_path, tok, files):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = files["rows"]
    d = tmp_path / "ultrachat_200k" / "data"             # HF's layout: <split>-0000i-of-0000n-<hash>.parquet
    d.mkdir(parents=True)
    for i, (lo, hi) in enumerate(((0, 3), (3, 4), (4, 9))):
        pq.write_table(pa.Table.from_pylist(rows[lo:hi]), str(d / f"train_sft-{i:05d}-of-00003-9f3a.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[:2]), str(d / "test_sft-00000-of-00001-77aa.parquet"))
    (tmp_path / "ultrachat_200k" / "README.md").write_text("not data")
    one, st1 = data.load_sft(files["all"], tok)
    shards, st = data.load_sft(str(tmp_path / "ultrachat_200k"), tok, split="train_sft")
    assert shards == one and len(one) == 9
    assert st["sources"] == [{"source": str(tmp_path / "ultrachat_200k"), "files": 3, "rows": 9}]
    assert data.load_sft(str(d), tok, split="test_sft")[0] == one[:2]          # the data/ folder itself works too
    with pytest.raises(data.DataError, match="holds the splits test_sft, train_sft; pick one with --split"):
        data.load_sft(str(tmp_path / "ultrachat_200k"), tok)
    with pytest.raises(data.DataError, match="no files of split 'train_prefs' \\(splits here: test_sft, train_sft\\)"):
        data.load_sft(str(tmp_path / "ultrachat_200k"), tok, split="train_prefs")
    capped, st = data.load_sft(str(d / "train_sft-*.parquet") + ":2", tok)       # a cap reads only the shards it needs
    assert capped == one[:2] and st["sources"][0]["files"] == 1


def test_jsonl_glob_equals_one_file(tmp_path, tok, files):
    rows = files["rows"]
    for i, (lo, hi) in enumerate(((0, 4), (4, 5), (5, 9))):
        write_jsonl(tmp_path / f"part-{i:05d}.jsonl", rows[lo:hi])
    got, st = data.load_sft(str(tmp_path / "part-*.jsonl"), tok)
    assert got == data.load_sft(files["all"], tok)[0] and st["sources"][0]["files"] == 3
    with pytest.raises(data.DataError, match="no file matches"):
        data.load_sft(str(tmp_path / "nothing-*.jsonl"), tok)


def test_mixture_with_caps_and_fingerprint(tok, files):
    a, b = files["a"], files["b"]
    ex, st = data.load_sft(f"{a}:3,{b}", tok)
    assert ex == data.load_sft(files["rows"][:3] + files["rows"][5:], tok)[0]     # 3 of a, then all of b
    assert st["sources"] == [{"source": f"{a}:3", "files": 1, "rows": 3}, {"source": b, "files": 1, "rows": 4}]
    assert st["rows"] == st["examples"] == 7
    assert data.load_sft(f"{a}:99", tok)[1]["sources"][0]["rows"] == 5          # a cap past the end: all rows
    fp = lambda spec: reference.data_fingerprint(tok, data.load_sft(spec, tok)[0])
    assert fp(f"{a}:3,{b}") == fp(f"{a}:3,{b}") != fp(f"{a}:2,{b}")               # the cap moves the fingerprint
    assert data.parse_sources("x:y.jsonl, z.json:12") == [("x:y.jsonl", None), ("z.json", 12)]   # only digits cap
    with pytest.raises(data.DataError, match="at least 1"):
        data.parse_sources("a.jsonl:0")


# ---------------------------------------------------------------------------- the authors' conventions
def test_empty_system_and_dedup_by_prompt(tok):
    q = lambda p, a, system=None: {"prompt": p, "messages": ([msg(S, system)] if system else []) + [msg(U, p), msg(A, a)]}
    rows = [q("Add 1 and 2.", "3"), q("Add 2 and 2.", "4", "You are a careful calculator."), q("Add 1 and 2.", "1 + 2 = 3")]
    plain = data.load_sft(rows, tok)[0]
    with_sys, st = data.load_sft(rows, tok, empty_system=True)
    assert with_sys[0]["input_ids"] == tokenizer.render_chat(tok, [msg(S, "")] + rows[0]["messages"])[0] != plain[0]["input_ids"]
    assert with_sys[1] == plain[1]                                                # already has one: unchanged
    dd, st = data.load_sft(rows, tok, dedup_prompts=True)
    assert dd == [plain[2], plain[1]] and st["duplicates"] == 1 and st["rows"] == 3   # last wins, first's place
    pairs = [{"chosen": [msg(U, "Add 1 and 2."), msg(A, "1 + 2 = 3")], "rejected": [msg(U, "Add 1 and 3."), msg(A, "4")]}]
    with pytest.raises(data.DataError, match="different prompts"):
        data.load_pairs(pairs, tok)
    (p,), _ = data.load_pairs(pairs, tok, prompt_from_chosen=True)
    same = [{"chosen": pairs[0]["chosen"], "rejected": pairs[0]["chosen"][:-1] + pairs[0]["rejected"][-1:]}]
    assert p == data.load_pairs(same, tok)[0][0]                                  # prompt = chosen[:-1]


# ---------------------------------------------------------------------------- recipes
COMMON = dict(optimizer="rmsprop", lr=5e-7, schedule="cosine", warmup_ratio=0.1, epochs=3, micro_batch_size=8,
              grad_accum=8, max_length=1024, precision="bf16", empty_system=True, dedup_prompts=True)
METHOD = {"sft": dict(loss="sft"),
          "ift": dict(loss="ift", lam=0.2, gamma=0.95, prop_kind="loss", prop_side="left", prop_norm="L1"),
          "dpo": dict(loss="dpo", beta=0.1, prompt_from_chosen=True),
          "orpo": dict(loss="orpo", orpo_beta=0.25, prompt_from_chosen=True),
          "simpo": dict(loss="simpo", simpo_beta=2.0, simpo_gamma_ratio=0.8, prompt_from_chosen=True)}
UC = "data/ultrachat_200k/data/train_sft-*.parquet:61136"
UF = "data/ultrafeedback_binarized/data/train_prefs-*.parquet:61136"
SCENARIO = {"s1_mistral7b": "models/Mistral-7B-v0.1", "s2_sftbeta": "models/mistral-7b-sft-beta"}


@pytest.mark.parametrize("scenario", sorted(SCENARIO))
@pytest.mark.parametrize("method", sorted(METHOD))
def test_recipe_values_are_the_papers(scenario, method):
    cfg = train.parse_config([f"--config={ROOT}/configs/{scenario}_{method}.json"])
    want = dict(COMMON, **METHOD[method], init_from=SCENARIO[scenario])
    if scenario == "s1_mistral7b" and method in ("sft", "ift"):
        want.update(data=f"{UC},{UF}", split="")           # 61,136 rows of UltraChat + 61,136 of UltraFeedback
    else:
        want.update(data="data/ultrafeedback_binarized", split="train_prefs")
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.micro_batch_size * cfg.grad_accum * 8 == 512                       # effective batch on 8 GPUs


def test_recipe_dry_run_builds_the_plan_without_a_model(tmp_path, tok, files):
    """s1 IFT with its data swapped for a tiny mixture of the same shape; init_from holds no weights,
    so the run could not have built a model."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(os.path.join(files["ckpt"], "config.json"), model_dir)
    rows = list({r["messages"][-2]["content"]: r for r in data.synthetic_task(200, 5)}.values())[:80]   # unique prompts
    a, b = write_jsonl(tmp_path / "uc.jsonl", rows[:60]), write_jsonl(tmp_path / "uf.jsonl", rows[60:])
    env = dict(os.environ, WORLD_SIZE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "train.py", "--config=configs/s1_mistral7b_ift.json", f"--data={a}:50,{b}",
                        f"--init_from={model_dir}", f"--tokenizer={tok.path}", f"--out_dir={tmp_path}/out", "--dry_run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.loads(p.stdout.split("dry run: ")[1])
    assert plan["train_examples"] == 70 and plan["global_batch"] == 64 and plan["steps_per_epoch"] == 1
    assert plan["total_steps"] == 3 and len(plan["data_fingerprint"]) == 16
    assert f"source {a}:50: 50 rows from 1 file(s)" in p.stdout and f"source {b}: 20 rows" in p.stdout
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


# ---------------------------------------------------------------------------- one-line user errors
def _bad_ckpt(tmp, files, kind):
    """A copy of the tiny checkpoint broken one way."""
    d = str(tmp / "bad_ckpt")
    shutil.copytree(files["ckpt"], d)
    st, cfg = os.path.join(d, "model.safetensors"), os.path.join(d, "config.json")
    if kind == "missing":
        os.remove(st)
    elif kind == "truncated":
        blob = open(st, "rb").read()
        open(st, "wb").write(blob[:len(blob) // 2])
    elif kind == "index":
        os.remove(st)
        open(os.path.join(d, "model.safetensors.index.json"), "w").write('{"weight_map": {"a": ')
    elif kind in ("config", "vocab"):
        c = json.load(open(cfg))
        c.update(intermediate_size=48) if kind == "config" else c.update(vocab_size=c["vocab_size"] - 10)
        json.dump(c, open(cfg, "w"))
    return d


def _case(tmp, files, kind):
    """(train.py arguments, the text the one line must contain) for one kind of user error."""
    d, tr = tmp, files["train"]
    good = [f"--data={tr}", f"--tokenizer={os.path.join(files['ckpt'], 'tokenizer.model')}", f"--out_dir={d}/out",
            "--loss=sft", "--micro_batch_size=4", "--max_steps=1", "--progress=false", "--max_length=64"]
    if kind == "malformed_row":
        bad = str(d / "bad.jsonl")
        open(bad, "w").write(open(tr).read().split("\n")[0] + '\n{"messages": [{"role": "bot", "content": "x"}]}\n')
        return good + [f"--data={bad}", "--dry_run"], f"{bad}:2: messages[0].role is 'bot'"
    if kind == "empty_file":
        open(d / "empty.jsonl", "w").close()
        return good + [f"--data={tr},{d}/empty.jsonl", "--dry_run"], f"{d}/empty.jsonl: empty file"
    if kind == "missing_file":
        return good + [f"--data={d}/nope.jsonl", "--dry_run"], f"{d}/nope.jsonl: no such file"
    if kind == "suffix":
        shutil.copy(tr, d / "train.txt")
        return good + [f"--data={d}/train.txt", "--dry_run"], f"{d}/train.txt: unsupported file type '.txt'"
    if kind == "split":
        (d / "ds").mkdir()
        shutil.copy(tr, d / "ds" / "train.jsonl")
        return good + [f"--data={d}/ds", "--split=test", "--dry_run"], f"{d}/ds: no files of split 'test'"
    if kind == "vocab":
        c = _bad_ckpt(d, files, "vocab")
        return good + [f"--init_from={c}", "--dry_run"], f"has vocab_size {files['vocab'] - 10}: ids >= {files['vocab'] - 10}"
    if kind == "resume":
        ck = d / "out" / "ckpt-000001"
        shutil.copytree(files["ckpt"], ck)
        torch.save({"step": 1, "optimizer": {}}, ck / "trainer_state.pt")
        blob = open(ck / "trainer_state.pt", "rb").read()
        open(ck / "trainer_state.pt", "wb").write(blob[:len(blob) // 2])
        return good + [f"--init_from={files['ckpt']}", "--resume=true"], f"{ck}/trainer_state.pt: corrupt trainer state"
    c = _bad_ckpt(d, files, kind)
    return good + [f"--init_from={c}"], {
        "missing": f"{c}: neither model.safetensors nor model.safetensors.index.json",
        "truncated": f"{c}/model.safetensors: not a readable safetensors file",
        "index": f"{c}/model.safetensors.index.json: not a valid safetensors index",
        "config": f"{c}/model.safetensors: 'model.layers.0.mlp.down_proj.weight' has shape (32, 40), expected (32, 48) "
                  f"from {c}/config.json",
    }[kind]


KINDS = ["malformed_row", "empty_file", "missing_file", "suffix", "split", "vocab", "resume", "missing", "truncated",
         "index", "config"]


@pytest.mark.parametrize("kind", KINDS)
def test_user_error_is_one_line_exit_2(tmp_path, files, tok, kind, capsys):
    """train.cli is what `python train.py` runs; an exception other than a user error would escape it
    and fail this test (test_cli_subprocess checks the real command line for a few kinds)."""
    argv, needle = _case(tmp_path, files, kind)
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_debug_shows_the_traceback(tmp_path, files):
    argv, _ = _case(tmp_path, files, "truncated")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        train.cli(argv + ["--debug"])


def test_cli_subprocess_one_line(tmp_path, files):
    """The real command lines of train.py and eval_gen.py: exit code, one line, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    argv, needle = _case(tmp_path, files, "truncated")
    p = run("train.py", *argv)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and needle in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "e").mkdir()
    c = _bad_ckpt(tmp_path / "e", files, "truncated")
    p = run("eval_gen.py", "--model", c, "--task", "arc_gen", "--data", os.path.join(ROOT, "tests/fixtures/arc_hf.jsonl"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert f"{c}/model.safetensors: not a readable safetensors file" in p.stderr


def test_data_inspection_checks_every_row(tmp_path, files, tok, capsys):
    """python data.py: one line on stderr and exit code 2 (a user error, as in train.py), even for a row it does
    not show."""
    _, needle = _case(tmp_path, files, "malformed_row")
    with pytest.raises(SystemExit) as e:
        data.main(["--tokenizer", tok.path, "--data", str(tmp_path / "bad.jsonl"), "--index", "0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and "\n" not in err


def test_parquet_without_pyarrow_is_one_line(tmp_path, files, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("pyarrow") else real_import(name, *a, **k))
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    argv, _ = _case(tmp_path, files, "missing_file")
    with pytest.raises(SystemExit) as e:
        train.cli(argv + [f"--data={tmp_path}/d.parquet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"{tmp_path}/d.parquet: reading .parquet files needs pyarrow" in err
