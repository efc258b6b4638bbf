"""
Does GRPO improve a supervised start? On the demo task (data.synthetic_task), per seed: a short SFT run is
the start; GRPO and REINFORCE then train from it on-policy with --reward=demo (partial credit per digit),
with the same prompts, samples, steps and learning rate; held-out greedy exact match (unseen prompts,
study.py's scoring) of the start and of each arm, compared seed by seed (paired t, exact Wilcoxon).

    python -m experiments.rl_study                  # 5 seeds (~10 min on one core of a shared machine)
    python -m experiments.rl_study --quick          # 2 seeds at a tiny budget (what the test suite runs)

Writes <out_dir>/report.json and prints a table. Runs train in-process, one thread each.
"""
import contextlib
import json
import os
import time
from dataclasses import dataclass, asdict

import torch

import tokenizer
import train
from experiments import study
from infra import atomic, flags


@dataclass
class Config:
    seeds: int = 5
    seed0: int = 0
    sft_steps: int = 400            # the supervised start (study.py's SFT arm: held-out exact match ~0.2)
    rl_steps: int = 100             # optimizer steps of each RL arm (one sampling round per step)
    prompts: int = 16               # prompts per RL step (micro-batch)
    n_samples: int = 4              # samples per prompt: GRPO's group
    max_new_tokens: int = 24
    rl_lr: float = 1e-4             # the same for both RL arms (3e-4 lowered both below the start on seed 0)
    n_train: int = 3200
    n_heldout: int = 200
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 344
    vocab_size: int = 512
    out_dir: str = "runs/rl_study"
    quick: bool = False


QUICK = dict(seeds=2, sft_steps=4, rl_steps=2, prompts=2, n_samples=2, max_new_tokens=6, n_train=64, n_heldout=4,
             dim=32, hidden_dim=64)
ARMS = {"GRPO": ["--loss=grpo"], "REINFORCE": ["--loss=reinforce"]}


def run(argv, log):
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return train.main(argv)


def one_seed(cfg, seed):
    """{arm: held-out exact match} for the SFT start and each RL arm of this seed."""
    torch.set_num_threads(1)
    scfg = study.Config(n_train=cfg.n_train, n_heldout=cfg.n_heldout, vocab_size=cfg.vocab_size, out_dir=cfg.out_dir)
    tok_path = study.seed_tokenizer(scfg, seed)
    tok, rows = tokenizer.Tokenizer(tok_path), study.heldout_rows(scfg, seed)
    base = [f"--seed={seed}", f"--n_train={cfg.n_train}", "--n_eval=0", "--gen_eval=0", "--progress=false",
            "--log_every=10", "--overwrite=true"]
    start_dir = os.path.join(cfg.out_dir, f"seed{seed}", "sft")
    os.makedirs(start_dir, exist_ok=True)
    start = run(base + ["--loss=sft", f"--max_steps={cfg.sft_steps}", "--micro_batch_size=32", "--lr=1e-3",
                        f"--tokenizer={tok_path}", f"--out_dir={start_dir}", f"--dim={cfg.dim}",
                        f"--n_layers={cfg.n_layers}", f"--n_heads={cfg.n_heads}", f"--n_kv_heads={cfg.n_kv_heads}",
                        f"--hidden_dim={cfg.hidden_dim}"], os.path.join(start_dir, "train.log"))["checkpoint"]
    out = {"SFT start": study.heldout_scores(start, tok, rows)[1]}
    for arm, args in ARMS.items():
        d = os.path.join(cfg.out_dir, f"seed{seed}", arm.lower())
        os.makedirs(d, exist_ok=True)
        ck = run(base + args + [f"--init_from={start}", "--reward=demo", "--onpolicy_every=1",
                                f"--n_samples={cfg.n_samples}", f"--max_new_tokens={cfg.max_new_tokens}",
                                f"--max_steps={cfg.rl_steps}", f"--micro_batch_size={cfg.prompts}",
                                f"--lr={cfg.rl_lr}", "--warmup_ratio=0", "--schedule=constant", f"--out_dir={d}"],
                 os.path.join(d, "train.log"))["checkpoint"]
        out[arm] = study.heldout_scores(ck, tok, rows)[1]
    return out


def compare(results, a, b):
    d = [r[a] - r[b] for r in results]
    mean, ci, p = study.paired_t(d)
    return {"diff": mean, "ci95": ci, "p_t": p, "p_wilcoxon": study.wilcoxon_exact(d), "wins": sum(x > 0 for x in d)}


def main(argv=None):
    given = vars(flags.dataclass_parser(Config, __doc__.strip().split("\n\n")[0]).parse_args(argv))
    cfg = Config(**{**(QUICK if given.get("quick") else {}), **given})
    t0 = time.time()
    results = [one_seed(cfg, s) for s in range(cfg.seed0, cfg.seed0 + cfg.seeds)]
    arms = list(results[0])
    print(f"held-out exact match, {cfg.seeds} seeds ({cfg.rl_steps} RL steps x {cfg.prompts} prompts x "
          f"{cfg.n_samples} samples from a {cfg.sft_steps}-step SFT start, lr {cfg.rl_lr}):")
    for a in arms:
        xs = [r[a] for r in results]
        print(f"  {a:<10} " + " ".join(f"{x:.3f}" for x in xs) + f"   mean {sum(xs) / len(xs):.3f}")
    comps = {f"GRPO - {b}": compare(results, "GRPO", b) for b in ("SFT start", "REINFORCE")}
    for k, c in comps.items():
        lo, hi = c["ci95"]
        print(f"  {k}: {c['diff']:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}), paired t p={c['p_t']:.3g}, "
              f"Wilcoxon p={c['p_wilcoxon']}, better on {c['wins']}/{len(results)} seeds")
    wall = time.time() - t0
    print(f"({wall:.0f} s)")
    report = {"config": asdict(cfg), "results": results, "comparisons": comps, "wall_s": wall}
    atomic.write_text(os.path.join(cfg.out_dir, "report.json"), json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
