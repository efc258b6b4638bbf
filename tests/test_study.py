"""study.py: its statistics against hand-computed values, and the --quick study end to end (structure and
that every arm trained; no outcome asserted). Plus the Frozen Lake sweep's start and step-prefix logic."""
import json
import math
import os

import pytest
import torch

from experiments import frozen_lake as fl, study


def test_t_distribution_known_values():
    assert study.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-10)            # Cauchy: 1/2 + atan(1)/pi
    # df = 2 has a closed form: 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, 0.3, 2.5, 40.0):
        assert study.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)
    assert study.t_ppf(0.975, 7) == pytest.approx(2.364624, abs=1e-6)       # printed t tables
    assert study.t_ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-6)
    assert study.t_ppf(0.975, 30) == pytest.approx(2.042272, abs=1e-6)


def test_paired_t_by_hand():
    mean, (lo, hi), p = study.paired_t([1.0, 2.0, 3.0])   # sd 1, se 1/sqrt 3, t = 2 sqrt 3, df 2
    assert mean == 2.0
    half = 4.302653 / math.sqrt(3)
    assert lo == pytest.approx(2 - half, abs=1e-5) and hi == pytest.approx(2 + half, abs=1e-5)
    t = 2 * math.sqrt(3)
    assert p == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-9)   # 0.0742
    assert study.paired_t([0.0, 0.0])[2] == 1.0


def test_wilcoxon_exact_by_hand():
    assert study.wilcoxon_exact([0.1] * 8) == pytest.approx(2 / 256)
    # ranks 1..4, W+ = 6: 7 of the 16 sign patterns give W+ >= 6
    assert study.wilcoxon_exact([1.0, 2.0, 3.0, -4.0]) == pytest.approx(2 * 7 / 16)
    # ties: |d| = 1, 1, 1, 2 -> mid-ranks 2, 2, 2, 4; W+ = 8 is reached by 4 of 16 patterns (a zero is dropped)
    assert study.wilcoxon_exact([1.0, 1.0, -1.0, 2.0, 0.0]) == pytest.approx(2 * 4 / 16)
    assert study.wilcoxon_exact([0.0, 0.0]) is None


def test_holm():
    assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert study.holm([0.5, None]) == [0.5, None]


def test_quick_study_every_arm_trains(tmp_path):
    out = str(tmp_path / "study")
    rep = study.main(["--quick", f"--out_dir={out}", "--frozen_lake=false"])
    arms, seeds = list(study.ARMS), rep["seeds"]
    assert rep["arms"] == arms and len(seeds) == 2
    assert {(r["arm"], r["seed"]) for r in rep["runs"]} == {(a, s) for a in arms for s in seeds}
    for r in rep["runs"]:
        steps = round(rep["config"]["steps"] * study.ARMS[r["arm"]][1])
        assert r["steps"] == steps and math.isfinite(r["final_train_loss"]) and math.isfinite(r["nll"])
        log = [json.loads(x) for x in open(os.path.join(out, study.slug(r["arm"]), f"seed{r['seed']}", "metrics.jsonl"))]
        assert log[-1]["step"] == steps                       # the run took every optimizer step
        assert 0 <= r["exact_match"] <= 1
    assert rep["runs"][1]["steps"] > rep["runs"][0]["steps"]  # SFT x4/3 ran more steps
    for metric in ("exact_match", "nll"):
        table = rep["summary"][metric]
        assert list(table) == arms and "diff" not in table["SFT"]
        for a in arms[1:]:
            d = [x - y for x, y in zip(table[a]["per_seed"], table["SFT"]["per_seed"])]
            assert table[a]["diff"] == pytest.approx(sum(d) / len(d))
            assert table[a]["ci95"][0] <= table[a]["diff"] <= table[a]["ci95"][1]
            assert {"p_t", "p_wilcoxon", "p_t_holm", "p_wilcoxon_holm"} <= set(table[a])
    md = open(os.path.join(out, "report.md")).read()
    assert all(f"| {a} |" in md for a in arms)
    assert json.load(open(os.path.join(out, "report.json")))["runs"] == rep["runs"]
    # a finished run is reused only when its command line matches
    again = study.main(["--quick", f"--out_dir={out}", "--frozen_lake=false", "--arms=SFT"])
    assert again["runs"][0] == next(r for r in rep["runs"] if r["arm"] == "SFT" and r["seed"] == seeds[0])


def test_frozen_lake_perturbed_start_and_sweep_prefix():
    cfg = fl.Config(seeds=1, steps=4, distill_steps=30, start="perturbed", perturb=0.5)
    star = fl.make_policy(25, cfg.hidden, 0)
    th = fl.start_policy(cfg, star, 25, 0)
    dw = (th[0].weight - star[0].weight).flatten()
    assert abs(dw.std().item() - 0.5 / 5) < 0.02 and abs(dw.mean().item()) < 0.02   # std perturb / sqrt(25)
    rnd = fl.start_policy(fl.Config(), star, 25, 0)
    assert torch.equal(rnd[0].weight, fl.make_policy(25, cfg.hidden, 0)[0].weight)
    with pytest.raises(ValueError, match="start"):
        fl.start_policy(fl.Config(start="optimal"), star, 25, 0)
    spec = dict(fl.SWEEP_QUICK, starts=("perturbed",), steps=(2, 4), seeds=1, distill_steps=30)
    rows = fl.sweep(spec)
    assert [(r["steps"], r["metric"]) for r in rows] == [(2, "table"), (2, "param"), (4, "table"), (4, "param")]
    # the 2-step row of the 4-step run is what a 2-step run ends at (Adam, constant lr)
    short, _ = fl.run(fl.Config(seeds=1, steps=2, lr=spec["lrs"][0], start="perturbed", distill_steps=30,
                                distill_lr=spec["distill_lr"]))
    for m in fl.METHODS:
        assert rows[0]["mean"][m] == pytest.approx(short[m]["table"][0], rel=1e-12)
        assert rows[1]["mean"][m] == pytest.approx(short[m]["param"][0], rel=1e-12)
    assert all(sorted(r["order"]) == sorted(fl.METHODS) for r in rows)
