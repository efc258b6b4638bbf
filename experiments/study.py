"""
Does IFT beat SFT? Every objective trained over the same seeds on the demo task, scored on unseen prompts,
compared with SFT seed by seed (paired), plus a Frozen Lake sweep over the choices the paper leaves open.

    python -m experiments.study                 # the full study: 8 seeds x 9 arms + the Frozen Lake sweep
    python -m experiments.study --quick         # every arm at a tiny budget, 2 seeds (what the test suite runs)
    python -m experiments.study --arms=SFT,IFT --seeds=3    # a subset, for a look

Arms (train.py objectives; everything not listed is train.py's default and the same for every arm):
  SFT, SFT x4/3 steps (an IFT step costs about 4/3 of an SFT step: one extra no-grad forward),
  IFT (lam 0.2, gamma 0.95), IFT gamma=0 (the input mix alone), IFT lam=0 (the loss weighting alone),
  DFT, and DPO / ORPO / SimPO on the synthetic pairs (chosen = the right answer, rejected = one digit
  of the final answer changed; data.synthetic_pairs), all from the same random init.
A seed draws the synthetic data, the tokenizer (one per seed, shared by its arms, so NLLs compare) and
the init. Each run trains in-process through train.main in its own out_dir, with torch's thread count
fixed per run (results do not depend on --workers). Held-out: rows drawn after the training rows whose
prompt never occurs in training; NLL (per-answer-token mean, then the mean over rows, true prefixes) and
greedy exact match, both computed here from the final checkpoint in the same way for every arm.
Statistics: plain Python (no scipy): Student t via its density integrated numerically, the exact
Wilcoxon signed-rank distribution by counting, Holm's correction over the arms compared with SFT.
Writes <out_dir>/report.md and report.json; a finished run is reused when its command line matches.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

import data
import ift
import tokenizer
import train
from infra import atomic, checkpoint, flags, hf_io


@dataclass
class Config:
    seeds: int = 8                  # seeds seed0 .. seed0 + seeds - 1
    seed0: int = 0
    steps: int = 400                # optimizer steps per arm (the x4/3 arm: round(4/3 of it))
    n_train: int = 3200             # synthetic training rows per seed (4 epochs of 400 x 32)
    n_heldout: int = 500            # unseen prompts scored per run (NLL and exact match)
    micro_batch_size: int = 32
    lr: float = 1e-3                # train.py's default, the same for every arm (no tuning)
    dim: int = 128                  # model shape, the same for every arm
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 344
    vocab_size: int = 512
    arms: str = ""                  # comma-separated subset of ARMS (default: all)
    workers: int = 2                # runs at a time (processes); 1 = in this process
    threads: int = 1                # torch threads per run
    frozen_lake: bool = True        # also run the Frozen Lake sweep
    out_dir: str = "runs/study"
    keep_checkpoints: bool = False
    quick: bool = False


QUICK = dict(workers=1, seeds=2, steps=3, n_train=96, n_heldout=8, micro_batch_size=8, dim=32, n_layers=1,
             n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=320)

# name -> (train.py arguments, step multiplier)
ARMS = {
    "SFT": (["--loss=sft"], 1.0),
    "SFT x4/3 steps": (["--loss=sft"], 4 / 3),
    "IFT": (["--loss=ift"], 1.0),
    "IFT gamma=0 (mix only)": (["--loss=ift", "--gamma=0"], 1.0),
    "IFT lam=0 (weighting only)": (["--loss=ift", "--lam=0"], 1.0),
    "DFT": (["--loss=dft"], 1.0),
    "DPO": (["--loss=dpo"], 1.0),
    "ORPO": (["--loss=orpo"], 1.0),
    "SimPO": (["--loss=simpo"], 1.0),
}
BASELINE = "SFT"

# ----------------------------------------------------------------------------- statistics (no scipy)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: the density integrated from 0 to |t| by
    Simpson's rule on u = atan(x / sqrt(df)) (a finite interval, smooth integrand; error < 1e-10)."""
    if not math.isfinite(t):
        return 0.0 if t < 0 else 1.0
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    # x = sqrt(df) tan u: f(x) dx = c sqrt(df) cos(u)^(df - 1) du
    U, n = math.atan(abs(t) / math.sqrt(df)), 2000
    h = U / n
    s = sum((1 if i in (0, n) else 4 if i % 2 else 2) * math.cos(i * h) ** (df - 1) for i in range(n + 1))
    half = c * math.sqrt(df) * s * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def t_ppf(q: float, df: int) -> float:
    """Inverse of t_cdf by bisection."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def paired_t(d):
    """Mean of the differences d, its t-based 95 % interval and the two-sided paired-t p-value."""
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, (float("nan"), float("nan")), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_ppf(0.975, n - 1) * se
    if se == 0:
        return mean, (mean, mean), (1.0 if mean == 0 else 0.0)
    return mean, (mean - half, mean + half), 2 * (1 - t_cdf(abs(mean / se), n - 1))


def wilcoxon_exact(d):
    """Two-sided exact Wilcoxon signed-rank p-value. Zero differences are dropped (Wilcoxon's rule); tied
    |d| get mid-ranks, and the null distribution is counted over all 2^n sign patterns of those ranks
    (doubled to integers), so ties are exact too. None when no difference is non-zero."""
    d = [x for x in d if x != 0]
    n = len(d)
    if n == 0:
        return None
    a = sorted(abs(x) for x in d)
    rank2 = {}   # doubled mid-rank of each distinct |d|
    i = 0
    while i < n:
        j = i
        while j < n and a[j] == a[i]:
            j += 1
        rank2[a[i]] = i + 1 + j      # 2 * mean of ranks i+1 .. j
        i = j
    r = [rank2[abs(x)] for x in d]
    w = sum(ri for ri, x in zip(r, d) if x > 0)
    counts = {0: 1}                  # distribution of the sum of a random subset of the ranks
    for ri in r:
        nxt = dict(counts)
        for s, c in counts.items():
            nxt[s + ri] = nxt.get(s + ri, 0) + c
        counts = nxt
    total = 2 ** n
    lower = sum(c for s, c in counts.items() if s <= w) / total
    upper = sum(c for s, c in counts.items() if s >= w) / total
    return min(1.0, 2 * min(lower, upper))


def holm(ps):
    """Holm-adjusted p-values (None passes through)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None and math.isfinite(p)), key=lambda i: ps[i])
    out, running = list(ps), 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - k) * ps[i]))
        out[i] = running
    return out

# ----------------------------------------------------------------------------- data and runs


def prompt_key(row):
    return json.dumps(row["messages"][:-1], sort_keys=True)


def heldout_rows(cfg, seed):
    """Rows drawn after the training rows (same generator) whose prompt never occurs in training."""
    rows = data.synthetic_task(cfg.n_train + 4 * cfg.n_heldout + 100, seed)
    seen = {prompt_key(r) for r in rows[:cfg.n_train]}
    out, keys = [], set()
    for r in rows[cfg.n_train:]:
        k = prompt_key(r)
        if k not in seen and k not in keys:
            out.append(r)
            keys.add(k)
    if len(out) < cfg.n_heldout:
        raise RuntimeError(f"only {len(out)} unseen held-out prompts for seed {seed}; lower --n_heldout")
    return out[:cfg.n_heldout]


def seed_tokenizer(cfg, seed):
    """One tokenizer per seed, trained on the seed's training rows (both sides of the pairs), shared by
    every arm of that seed."""
    path = os.path.join(cfg.out_dir, "tokenizers", f"seed{seed}-v{cfg.vocab_size}-n{cfg.n_train}")
    if not os.path.isfile(path + ".model"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tokenizer.train_tokenizer(data.corpus_text(data.synthetic_pairs(cfg.n_train, seed)), path, cfg.vocab_size)
    return path + ".model"


def slug(name):
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()


def run_argv(cfg, arm, seed, out_dir, tok_path):
    args, mult = ARMS[arm]
    return args + [f"--seed={seed}", f"--out_dir={out_dir}", f"--tokenizer={tok_path}",
                   f"--max_steps={round(cfg.steps * mult)}", f"--n_train={cfg.n_train}", "--n_eval=0",
                   "--gen_eval=0", "--progress=false", f"--micro_batch_size={cfg.micro_batch_size}",
                   f"--lr={cfg.lr}", f"--dim={cfg.dim}", f"--n_layers={cfg.n_layers}", f"--n_heads={cfg.n_heads}",
                   f"--n_kv_heads={cfg.n_kv_heads}", f"--hidden_dim={cfg.hidden_dim}",
                   f"--vocab_size={cfg.vocab_size}", "--log_every=25"]


@torch.no_grad()
def heldout_scores(ckpt, tok, rows):
    """(NLL, exact match) of a checkpoint on rows: NLL = per-row mean over answer tokens, mean over rows."""
    model = hf_io.load_model(ckpt, dtype=torch.float32).eval()
    ex, _ = data.load_sft(rows, tok)
    tot = 0.0
    for i in range(0, len(ex), 64):
        batch = data.collate(ex[i:i + 64], tok.pad_id)
        lp, m = ift.token_logps(model, batch)
        tot += float((-lp.sum(-1) / m.sum(-1).clamp(min=1)).sum())
    em, _ = train.generation_exact_match(model, tok, rows, len(rows), torch.device("cpu"))
    return tot / len(ex), em


def one_run(cfg, arm, seed):
    """Train one (arm, seed) in this process, score it, return its record (cached on disk)."""
    torch.set_num_threads(cfg.threads)
    out_dir = os.path.join(cfg.out_dir, slug(arm), f"seed{seed}")
    tok_path = seed_tokenizer(cfg, seed)
    argv = run_argv(cfg, arm, seed, out_dir, tok_path)
    rec_path = os.path.join(out_dir, "result.json")
    key = {"argv": argv, "n_heldout": cfg.n_heldout, "threads": cfg.threads}
    if os.path.isfile(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        if rec.get("key") == key:
            return rec
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    torch.manual_seed(seed)   # train.main seeds again; this only keeps a failed run from shifting the next
    t0 = time.time()
    log = os.path.join(out_dir, "train.log")
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            summary = train.main(argv)
        except SystemExit as e:
            raise RuntimeError(f"{arm} seed {seed} failed ({e}); see {log}") from None
    t1 = time.time()
    tok = tokenizer.Tokenizer(tok_path)
    nll, em = heldout_scores(summary["checkpoint"], tok, heldout_rows(cfg, seed))
    rec = {"arm": arm, "seed": seed, "key": key, "exact_match": em, "nll": nll,
           "final_train_loss": summary["final_train_loss"], "steps": round(cfg.steps * ARMS[arm][1]),
           "train_s": t1 - t0, "eval_s": time.time() - t1}
    if not cfg.keep_checkpoints:
        for p in checkpoint.list_checkpoints(out_dir):
            shutil.rmtree(p, ignore_errors=True)
    atomic.write_text(rec_path, json.dumps(rec))
    return rec


def _worker(args):
    cfg, arm, seed = args
    return one_run(cfg, arm, seed)


def run_all(cfg, arms, seeds):
    jobs = [(cfg, a, s) for s in seeds for a in arms]
    for s in seeds:                   # tokenizers first, so parallel workers never race to write one
        seed_tokenizer(cfg, s)
    recs, t0 = [], time.time()

    def note(r):
        recs.append(r)
        print(f"[{len(recs)}/{len(jobs)} {time.time() - t0:6.0f} s] {r['arm']:<28} seed {r['seed']}: exact match "
              f"{r['exact_match']:.3f}  NLL {r['nll']:.4f}  ({r['train_s']:.0f} s train)", flush=True)
    if cfg.workers <= 1:
        for j in jobs:
            note(_worker(j))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn")) as ex:
            for r in ex.map(_worker, jobs):
                note(r)
    return recs

# ----------------------------------------------------------------------------- report


def summarize(recs, arms, seeds):
    """{metric: {arm: {...}}}: per-arm mean/sd and, against SFT over the same seeds, the paired mean
    difference, its 95 % t interval, paired-t and exact Wilcoxon p-values (Holm-adjusted over arms too)."""
    by = {(r["arm"], r["seed"]): r for r in recs}
    out = {}
    for metric in ("exact_match", "nll"):
        table = {}
        for a in arms:
            xs = [by[a, s][metric] for s in seeds]
            mean = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            row = {"per_seed": xs, "mean": mean, "sd": sd,
                   "train_s": sum(by[a, s]["train_s"] for s in seeds) / len(seeds)}
            if a != BASELINE and BASELINE in arms:
                d = [by[a, s][metric] - by[BASELINE, s][metric] for s in seeds]
                diff, ci, p_t = paired_t(d)
                row.update(diff=diff, ci95=list(ci), p_t=p_t, p_wilcoxon=wilcoxon_exact(d),
                           better=sum((x > 0) if metric == "exact_match" else (x < 0) for x in d),
                           worse=sum((x < 0) if metric == "exact_match" else (x > 0) for x in d))
            table[a] = row
        others = [a for a in arms if "diff" in table[a]]
        for key in ("p_t", "p_wilcoxon"):
            for a, p in zip(others, holm([table[a][key] for a in others])):
                table[a][key + "_holm"] = p
        out[metric] = table
    return out


def fmt_p(p):
    return "–" if p is None or not math.isfinite(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown(cfg, summ, seeds, wall_s, lake_md=""):
    lines = [f"Demo task, {len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), {cfg.steps} steps × {cfg.micro_batch_size} "
             f"examples per arm (SFT x4/3: {round(cfg.steps * 4 / 3)}), {cfg.n_train} training rows, "
             f"{cfg.dim}-dim {cfg.n_layers}-layer model, AdamW lr {cfg.lr} cosine; held-out: {cfg.n_heldout} "
             f"unseen prompts per seed. Differences are arm − SFT on the same seed; 95 % interval from the paired t; "
             f"p: paired t / exact Wilcoxon signed-rank (two-sided), Holm-adjusted over the {len(summ['nll']) - 1} "
             f"arms compared with SFT in brackets. Wall time {wall_s / 60:.1f} min.", ""]
    for metric, name, better in (("exact_match", "held-out exact match", "higher"),
                                 ("nll", "held-out NLL (true prefixes)", "lower")):
        lines += [f"**{name}** ({better} is better)", "",
                  "| arm | mean ± sd | − SFT [95 % CI] | p (t) [Holm] | p (Wilcoxon) [Holm] | seeds better / worse | train s/run |",
                  "|---|---|---|---|---|---|---|"]
        for a, r in summ[metric].items():
            if "diff" in r:
                lines.append(f"| {a} | {r['mean']:.4f} ± {r['sd']:.4f} | {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, "
                             f"{r['ci95'][1]:+.4f}] | {fmt_p(r['p_t'])} [{fmt_p(r['p_t_holm'])}] | "
                             f"{fmt_p(r['p_wilcoxon'])} [{fmt_p(r['p_wilcoxon_holm'])}] | {r['better']} / {r['worse']} | "
                             f"{r['train_s']:.0f} |")
            else:
                lines.append(f"| {a} | {r['mean']:.4f} ± {r['sd']:.4f} | (baseline) | | | | {r['train_s']:.0f} |")
        lines.append("")
    return "\n".join(lines) + ("\n" + lake_md if lake_md else "")


def parse(argv=None) -> Config:
    given = vars(flags.dataclass_parser(Config, __doc__.strip().split("\n\n")[0]).parse_args(argv))
    # --quick: tiny defaults; anything given on the command line still wins
    return Config(**{**(QUICK if given.get("quick") else {}), **given})


def main(argv=None):
    cfg = parse(argv)
    arms = [a.strip() for a in cfg.arms.split(",")] if cfg.arms else list(ARMS)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        sys.exit(f"error: unknown arm(s) {bad}; known: {', '.join(ARMS)}")
    seeds = list(range(cfg.seed0, cfg.seed0 + cfg.seeds))
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    recs = run_all(cfg, arms, seeds)
    summ = summarize(recs, arms, seeds)
    lake = None
    lake_md = ""
    if cfg.frozen_lake:
        from experiments import frozen_lake
        lake = frozen_lake.sweep(frozen_lake.SWEEP_QUICK if cfg.quick else frozen_lake.SWEEP)
        lake_md = frozen_lake.sweep_markdown(lake)
    wall = time.time() - t0
    md = markdown(cfg, summ, seeds, wall, lake_md)
    report = {"config": dataclasses.asdict(cfg), "seeds": seeds, "arms": arms, "wall_s": wall,
              "summary": summ, "runs": recs, "frozen_lake": lake}
    atomic.write_text(os.path.join(cfg.out_dir, "report.json"), json.dumps(report, indent=1))
    atomic.write_text(os.path.join(cfg.out_dir, "report.md"), md)
    print(md)
    print(f"wrote {os.path.join(cfg.out_dir, 'report.md')} and report.json ({wall:.0f} s)")
    return report


if __name__ == "__main__":
    main()
