"""benchmarks/gpu.py: the tiny run covers every section (so the GPU script cannot rot between GPU runs), and the
driver records failures and budget skips instead of dying."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu as bench_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_has_every_section_ok(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--gpu", "--tiny", f"--out={out}"],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    S = rep["sections"]
    assert list(S) == ["env", "parity", "train", "torchrun", "generate", "eval"]
    bad = {k: v.get("error") or v.get("reason") for k, v in S.items() if v["status"] != "ok"}
    assert not bad, bad
    assert S["env"]["matmul_tflops"] > 0 and S["env"]["copy_gb_s"] > 0
    for mode in ("fp32", "bf16"):
        assert all(S["parity"][mode][k] for k in ("logits_ok", "sft_ok", "ift_ok", "generate_ok"))
    assert S["parity"]["bf16"]["logits_rel"] > 0      # bf16 really ran in bf16 (not silently fp32)
    runs = S["train"]["runs"]
    assert {(x["parallel"], x["objective"], x["grad_checkpointing"]) for x in runs if x["status"] == "ok"} == \
        {("single", o, c) for o in ("sft", "ift", "dpo") for c in (False, True)} | {("fsdp", "ift", True)}
    assert all(x["tok_s"] > 0 and x["loss"] == x["loss"] for x in runs)          # finite loss (not NaN)
    assert S["train"]["optimizer"].startswith("RMSprop (per-tensor)")            # the 7B recipe's, on CPU
    assert S["train"]["optimizer"].endswith("built by train.make_optimizer")
    tr = S["torchrun"]["runs"]
    assert {x["parallel"] for x in tr} == {"fsdp", "ddp"} and any(x["onpolicy"] for x in tr)
    assert all(x["status"] == "ok" and x["final_train_loss"] is not None for x in tr)
    assert [d["batch"] for d in S["generate"]["decode"] if d["status"] == "ok"] == [1, 16]
    assert all(d["first_call_s"] > 0 and d["decode_tok_s"] > 0 for d in S["generate"]["decode"])
    ev = S["eval"]
    assert ev["questions"] == ev["of"] and ev["new_tokens"] > 0 and ev["batches"] == 3
    assert ev["first_batch_s"] > 0 and ev["steady_s"] > 0 and ev["steady_questions_per_s"] > 0
    assert "| section | status | seconds | result |" in p.stdout and "| torchrun | ok |" in p.stdout


def _run(budget):
    return bench_gpu.Run(device=torch.device("cpu"), tiny=True, budget_s=budget, jobs=1, seq_len=64, eval_batch=8)


def test_failures_and_budget_are_recorded_and_the_run_goes_on(tmp_path):
    calls, saved = [], []

    def boom(r):
        calls.append("boom")
        raise RuntimeError("kaputt")

    def fine(r):
        calls.append("fine")
        return {"headline": "fine", "x": 1}

    def partial(r):
        calls.append("partial")
        return {"failures": ["one config failed"], "y": 2}

    def spend(r):
        calls.append("spend")
        r.budget_s = 0.0           # the budget runs out while this section runs
        return {}
    r = _run(100.0)
    rep = bench_gpu.run_sections(r, [("a", boom), ("b", fine), ("c", partial), ("d", spend), ("e", fine)],
                                 {"sections": {}}, save=lambda rep: saved.append(json.dumps(rep)))
    S = rep["sections"]
    assert calls == ["boom", "fine", "partial", "spend"]                 # e never started
    assert S["a"]["status"] == "failed" and "RuntimeError: kaputt" in S["a"]["error"] and "traceback" in S["a"]
    assert S["b"]["status"] == "ok" and S["b"]["x"] == 1 and S["b"]["seconds"] >= 0
    assert S["c"]["status"] == "failed" and S["c"]["y"] == 2 and S["c"]["error"] == "one config failed"
    assert S["d"]["status"] == "ok"
    assert S["e"]["status"] == "skipped" and "budget" in S["e"]["reason"]
    assert len(saved) == 5                                              # written after every section
    bench_gpu.write_json(str(tmp_path / "o.json"), rep)
    assert json.loads((tmp_path / "o.json").read_text())["sections"]["e"]["status"] == "skipped"
    assert os.listdir(tmp_path) == ["o.json"]                          # no temp file left behind
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--only=train,gpu"])                       # unknown section names are errors


def test_each_section_stops_at_its_end():
    """A section entered with no time left does at most one unit of work (a matmul size, a batch) and
    records what it skipped: nothing overruns the budget by more than that."""
    r = _run(400.0)
    r.env = bench_gpu.sec_env(r)
    for name, fn in bench_gpu.SECTIONS:
        r.budget_s = r.elapsed()           # the section's end is now
        if name == "env":
            assert len(fn(r)["matmul_sizes"]) == 1
            continue
        with pytest.raises(bench_gpu.Skipped) as e:
            fn(r)
        assert e.value.args[0].startswith("budget"), (name, e.value.args)
        res = e.value.results
        if name == "train":
            assert res["runs"] and all(x["status"] == "skipped" and "budget" in x["reason"] for x in res["runs"])
        elif name == "torchrun":
            assert all(x["status"] == "skipped" for x in res["runs"])
        elif name == "generate":
            assert all(d["status"] == "skipped" for d in res["decode"]) and "prefill" not in res
        elif name == "eval":
            assert res["batches"] == 1 and res["questions"] < res["of"]


def test_sections_leave_the_later_sections_their_planned_share():
    seen = {}

    def look(r):
        seen[len(seen)] = (r.reserved_s, r.left())
        return {}
    r = _run(100.0)
    rep = bench_gpu.run_sections(r, [("train", look), ("generate", look), ("eval", look)], {"sections": {}},
                                 only={"train", "eval"})
    P = bench_gpu.PLAN
    assert seen[0][0] == pytest.approx(100 * P["eval"]) and seen[1][0] == 0.0     # generate not selected
    assert seen[0][1] <= 100 * (1 - P["eval"]) and rep["sections"]["generate"]["status"] == "skipped"
    assert sum(P.values()) <= 1.0
