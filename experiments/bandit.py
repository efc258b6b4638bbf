"""
The didactic bandit of Tajwar et al. 2024 (arXiv 2404.14367, §4; docs/METHOD.md §3.3), with every loss from ift.py.

Tabular bandit (default, seconds):
  * 100 actions; pi_ref = exact bin masses of tanh(X), X ~ Cauchy(-0.7, 0.4), over 100 equal bins of [-1, 1];
    R_far(a) = exp(-((a-70)/10)^2) peaks where pi_ref has little mass, R_near (centre 20) on its mode.
  * policy = one logits table initialised to log pi_ref, shared by every prompt. A "prompt" is one draw of
    N = 10 responses: with P prompts a step sees P x N samples, and all pairs inside each prompt.
  * methods: best-of-N (NLL of each prompt's best sample: no negative gradient), DPO and IPO (all pairs
    within a prompt, winner = higher reward, gap >= threshold), REINFORCE (r - running mean baseline),
    PPO (clipped ratio to the policy that drew the samples, rewards normalised by the running mean and std
    of all rewards so far, no value head) and GRPO (the same clip, advantages normalised within each
    prompt's N samples). With a fresh draw every step the ratio is 1 and the clip never binds; offline,
    the same draw is reused for every step and the clip stops each sample's push at 1 ± clip.
  * offline = the P x N samples drawn once from pi_ref and reused every step; on-policy = a fresh draw
    from the current policy every `every` steps. Same Adam, lr and number of steps for every arm.
  E1: exact E_pi[R] after training, offline vs on-policy, on R_far and R_near.
  E2: offline DPO/IPO vs offline best-of-N; implicit rewards h = log pi - log pi_ref of y_w (each prompt's
      best sample, as the authors' code logs it) and y_l (its other samples) against the number of prompts.
Sequence bandit (--seq, minutes; --seq --quick for tests): a tiny model.py transformer, 1-token prompt,
L generated tokens, reward = mean bump over them. It is first fitted to the unigram pi_ref, then a frozen
copy is the reference. Best-of-N SFT vs best-of-N IFT (where they can differ: IFT conditions on its own
greedy guesses), DPO, IPO, REINFORCE, PPO, GRPO; offline vs on-policy at equal steps and lr.

    python -m experiments.bandit                    # E1 + E2 tables (~20 s)
    python -m experiments.bandit --seq              # + the sequence bandit (~3 min on 1 core)
    python -m experiments.bandit --seq --quick      # the sequence bandit at test size (~10 s)
    python -m experiments.bandit --plot             # + bandit.png (needs matplotlib)
"""
import copy
import math
import time
from dataclasses import dataclass

import torch

import ift
from generate import generate
from infra import flags
from model import ModelArgs, Transformer

K = 100  # actions


@dataclass
class Config:
    seeds: int = 5
    steps: int = 100              # gradient steps, identical for every arm
    lr: float = 0.05              # Adam, identical for every arm
    prompts: int = 100
    n: int = 10                   # samples per prompt
    beta_dpo: float = 0.05
    ipo_margin: float = 10.0      # IPO target h = 1/(2β)
    threshold: float = 0.2        # skip pairs whose reward gap is smaller
    clip: float = 0.2             # PPO/GRPO ratio clip (the paper's and TRL's)
    pg_kl: float = 0.0            # PPO/GRPO KL weight to pi_ref (PPO: log-ratio, GRPO: k3); 0 = none
    every: int = 1                # on-policy: fresh samples every `every` steps
    e2_prompts: str = "1,2,5,10,20,50,100"
    # sequence bandit
    seq: bool = False
    quick: bool = False
    seq_len: int = 4
    seq_prompts: int = 8
    seq_steps: int = 100
    seq_lr: float = 1e-3
    seq_seeds: int = 5
    seq_threshold: float = 0.05
    lam: float = 0.2              # IFT
    gamma: float = 0.95
    plot: bool = False
    out: str = "bandit.png"

# ----------------------------------------------------------------------------- the bandit


def ref_probs(x0=-0.7, s=0.4):
    """Exact bin masses (float64): P(tanh X in [u, v]) = F(atanh v) - F(atanh u), F the Cauchy CDF;
    atanh(±1) = ±inf gives the edge bins all the tail mass."""
    edges = torch.linspace(-1, 1, K + 1, dtype=torch.float64)
    cdf = 0.5 + torch.atan((torch.atanh(edges) - x0) / s) / math.pi
    return cdf[1:] - cdf[:-1]


def reward(centre):
    a = torch.arange(K, dtype=torch.float64)
    return torch.exp(-((a - centre) / 10) ** 2)


REWARDS = {"R_far": 70, "R_near": 20}


def pairs(y, r, threshold):
    """All pairs inside each prompt: (prompt idx, winner, loser) with r_w - r_l >= threshold."""
    i, j = torch.triu_indices(y.shape[1], y.shape[1], 1)
    ri, rj = r[:, i], r[:, j]
    w = torch.where(ri >= rj, y[:, i], y[:, j])
    l_ = torch.where(ri >= rj, y[:, j], y[:, i])
    keep = (ri - rj).abs() >= threshold
    p = torch.arange(y.shape[0])[:, None].expand_as(keep)
    return p[keep], w[keep], l_[keep]


def best_of(y, r):
    return y.gather(1, r.argmax(1, keepdim=True))[:, 0]


def tab_loss(method, lp, logp_ref, y, r, cfg, state):
    """The objective on the table's log-probs lp [K] for samples y [P, N] with rewards r [P, N]."""
    if method == "best_of_n":
        # NLL of each prompt's best sample; with one-token answers IFT is exactly this (docs/METHOD.md §3.2).
        best = lp[best_of(y, r)][:, None]
        return ift.ift_objective(best, torch.ones_like(best, dtype=torch.bool), 0.0)[0]
    if method in ("dpo", "ipo"):
        _, w, l_ = pairs(y, r, cfg.threshold)
        if len(w) == 0:
            return None                                     # nothing to learn from this draw
        if method == "dpo":
            return ift.dpo_loss(lp[w], lp[l_], logp_ref[w], logp_ref[l_], beta=cfg.beta_dpo)[0]
        return ift.ipo_loss(lp[w], lp[l_], logp_ref[w], logp_ref[l_], beta=1 / (2 * cfg.ipo_margin))[0]
    if method == "reinforce":
        # b = running mean of rewards (first batch: its own mean), as onpolicy.py
        m = r.mean().item()
        state["b"] = m if "b" not in state else 0.9 * state["b"] + 0.1 * m
        return -((r - state["b"]) * lp[y]).mean()
    if method in ("ppo", "grpo"):   # one-token answers: each sample is one token
        adv = pg_advantages(method, r, state)
        x, old, ref = lp[y].reshape(-1, 1), state["old_lp"][y].reshape(-1, 1), logp_ref[y].reshape(-1, 1)
        return ift.clipped_pg_loss(x, old, torch.ones_like(x, dtype=torch.bool), adv, ref, clip_low=cfg.clip,
                                   clip_high=cfg.clip, kl_coef=cfg.pg_kl,
                                   kl_estimator="logratio" if method == "ppo" else "k3")[0]
    raise ValueError(method)


def pg_advantages(method, r, state):
    """Advantages of a draw's rewards r [P, N], computed once per draw (state["fresh"]): PPO normalises by the
    running mean/std of every reward drawn so far, GRPO within each prompt's N samples."""
    if state.pop("fresh", False) or "adv" not in state:
        if method == "ppo":
            n, s1, s2 = state.get("run", (0, 0.0, 0.0))
            state["run"] = n, s1, s2 = n + r.numel(), s1 + r.sum().item(), s2 + (r * r).sum().item()
            mean = s1 / n
            state["adv"] = ift.running_advantages(r.flatten(), mean, max(s2 / n - mean * mean, 0.0) ** 0.5)
        else:
            state["adv"] = ift.group_advantages(r, "group").flatten()
    return state["adv"]


def train_table(method, onpolicy, centre, cfg, seed, prompts=None):
    """One arm. Returns (final log-probs [K], E_pi[R] after every step incl. 0, the offline samples)."""
    g = torch.Generator().manual_seed(seed)
    P = prompts or cfg.prompts
    logp_ref = ref_probs().log()
    R = reward(centre)
    theta = logp_ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    draw = lambda logits: torch.multinomial(logits.softmax(-1).expand(P, K), cfg.n, True, generator=g)
    y0 = y = draw(logp_ref)          # on-policy's first draw is the offline data set
    curve, state = [(logp_ref.exp() @ R).item()], {"old_lp": logp_ref, "fresh": True}
    for t in range(cfg.steps):
        if onpolicy and t > 0 and t % cfg.every == 0:
            y = draw(theta.detach())
            state.update(old_lp=theta.detach().log_softmax(-1), fresh=True)   # PPO/GRPO: the drawing policy
        loss = tab_loss(method, theta.log_softmax(-1), logp_ref, y, R[y], cfg, state)
        if loss is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append((theta.detach().softmax(-1) @ R).item())
    return theta.detach().log_softmax(-1), curve, y0


def implicit_rewards(lp, logp_ref, y, r, threshold):
    """h = log pi - log pi_ref. Per prompt (the authors' logging): y_w = its best sample, y_l = the others.
    Per pair (TRL's rewards/chosen): mean h of the winners / losers of the pairs DPO trained on."""
    h = lp - logp_ref
    best = r.argmax(1, keepdim=True)
    others = torch.ones_like(y, dtype=torch.bool).scatter_(1, best, False)
    hw, hl = h[y.gather(1, best)].mean().item(), h[y][others].mean().item()
    _, w, l_ = pairs(y, r, threshold)
    pw, pl = (h[w].mean().item(), h[l_].mean().item()) if len(w) else (0.0, 0.0)
    return {"h_w": hw, "h_l": hl, "margin": hw - hl, "pair_h_w": pw, "pair_h_l": pl}


def stats(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)


def fmt(xs):
    m, s = stats(xs)
    return f"{m:6.3f} ± {s:.3f}"


def e1(cfg, methods=("best_of_n", "dpo", "ipo", "reinforce", "ppo", "grpo")):
    """{(reward, method, 'offline'|'onpolicy'): [E_pi[R] per seed]} and the mean curves."""
    out, curves = {}, {}
    for rname, c in REWARDS.items():
        for m in methods:
            for mode in ("offline", "onpolicy"):
                runs = [train_table(m, mode == "onpolicy", c, cfg, s) for s in range(cfg.seeds)]
                out[rname, m, mode] = [cv[-1] for _, cv, _ in runs]
                curves[rname, m, mode] = torch.tensor([cv for _, cv, _ in runs]).mean(0).tolist()
    return out, curves


def e2(cfg, method="dpo", centre=70):
    """Offline `method` on R_far for each number of prompts: implicit rewards and E_pi[R], per seed."""
    logp_ref, R = ref_probs().log(), reward(centre)
    res = {}
    for P in [int(x) for x in cfg.e2_prompts.split(",")]:
        rows = []
        for s in range(cfg.seeds):
            lp, cv, y = train_table(method, False, centre, cfg, s, prompts=P)
            rows.append({**implicit_rewards(lp, logp_ref, y, R[y], cfg.threshold), "ER": cv[-1]})
        res[P] = {k: [r[k] for r in rows] for k in rows[0]}
    return res


def report_tab(cfg, r1, r2):
    p_ref, n_ = ref_probs(), cfg.n
    print(f"pi_ref: E[R_far] = {(p_ref @ reward(70)).item():.4f}, E[R_near] = {(p_ref @ reward(20)).item():.4f}")
    print(f"\nE1  exact E_pi[R] after {cfg.steps} Adam steps (lr {cfg.lr}), {cfg.prompts} prompts x N={n_}, "
          f"{cfg.seeds} seeds (mean ± std)")
    print(f"{'reward':<7} {'method':<10} {'offline':>15} {'on-policy':>15} {'gap':>7}")
    for (rname, m, mode), v in r1.items():
        if mode == "offline":
            on = r1[rname, m, "onpolicy"]
            print(f"{rname:<7} {m:<10} {fmt(v):>15} {fmt(on):>15} {stats(on)[0] - stats(v)[0]:>7.3f}")
    for m in ("dpo", "ipo"):
        d = {rn: stats(r1[rn, m, "offline"])[0] - stats(r1[rn, "best_of_n", "offline"])[0] for rn in REWARDS}
        print(f"E2  offline {m} - offline best_of_n: " + ", ".join(f"{k} {v:+.3f}" for k, v in d.items()))
    print("\nE2  offline DPO on R_far vs number of prompts: implicit rewards h = log pi - log pi_ref")
    print(f"{'prompts':>7} {'E_pi[R]':>15} {'h(y_w)':>15} {'h(y_l)':>15} {'margin':>15} {'pair h(y_w)':>15}")
    for P, v in r2.items():
        print(f"{P:>7} {fmt(v['ER']):>15} {fmt(v['h_w']):>15} {fmt(v['h_l']):>15} {fmt(v['margin']):>15} "
              f"{fmt(v['pair_h_w']):>15}")
    print("  h(y_w): each prompt's best sample, h(y_l): its other samples (the authors' logging); "
          "pair h(y_w): mean over the trained pairs' winners")

# ----------------------------------------------------------------------------- sequence bandit (model.py)


def seq_model(seed, L):
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, hidden_dim=64, vocab_size=K,
                     sliding_window=None, max_position_embeddings=L + 1, tie_word_embeddings=False)
    return Transformer(args).init_weights(seed=seed)


def seq_rows(prompts, ys):
    """prompt token + response -> batch with labels on the response only."""
    ids = torch.tensor([[p] + y for p, y in zip(prompts, ys)])
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels}


def fit_reference(model, L, steps, seed):
    """Fit every position to the unigram pi_ref (soft cross-entropy on sequences drawn from pi_ref)."""
    g = torch.Generator().manual_seed(seed)
    p = ref_probs().float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ids = torch.multinomial(p, 64 * (L + 1), True, generator=g).view(64, L + 1)
        logp = model(ids).float().log_softmax(-1)
        loss = -(logp * p).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def seq_sample(model, prompts, n, L, seed, R):
    """N responses per prompt from `model` (temperature 1), rewards = mean bump over the L tokens."""
    ps = [p for p in prompts for _ in range(n)]
    ys = generate(model, [[p] for p in ps], L, temperature=1.0, seed=seed, stop_ids=[-1])  # never stops
    r = R[torch.tensor(ys)].mean(-1).view(len(prompts), n)
    return ps, ys, r


@torch.no_grad()
def seq_expected_reward(model, L, R, seed, m=256):
    """E_pi[mean_t R(y_t)]: sampled prefixes, exact expectation of each next token (low variance)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, K, (m,), generator=g).tolist()
    ys = generate(model, [[p] for p in prompts], L, temperature=1.0, seed=seed, stop_ids=[-1])
    ids = torch.tensor([[p] + y for p, y in zip(prompts, ys)])
    probs = model(ids[:, :-1]).float().softmax(-1)
    return (probs @ R.float()).mean().item()


def seq_loss(method, model, ref, prompts, ys, r, cfg, state):
    P, n = r.shape
    if method in ("sft", "ift"):   # best-of-N: the highest-reward sample of each prompt is the target
        b = r.argmax(1)
        batch = seq_rows([prompts[i * n] for i in range(P)], [ys[i * n + int(b[i])] for i in range(P)])
        return (ift.sft_loss(model, batch) if method == "sft" else
                ift.ift_loss(model, batch, lam=cfg.lam, gamma=cfg.gamma))[0]
    if method in ("dpo", "ipo"):   # best vs worst per prompt, skipped below the threshold
        w, l_ = r.argmax(1), r.argmin(1)
        keep = [i for i in range(P) if r[i, w[i]] - r[i, l_[i]] >= cfg.seq_threshold]
        if not keep:
            return None
        c = seq_rows([prompts[i * n] for i in keep], [ys[i * n + int(w[i])] for i in keep])
        j = seq_rows([prompts[i * n] for i in keep], [ys[i * n + int(l_[i])] for i in keep])
        pc, pr = ift.seq_logps(model, c)[0], ift.seq_logps(model, j)[0]
        with torch.no_grad():
            rc, rr = ift.seq_logps(ref, c)[0], ift.seq_logps(ref, j)[0]
        if method == "dpo":
            return ift.dpo_loss(pc, pr, rc, rr, beta=cfg.beta_dpo)[0]
        return ift.ipo_loss(pc, pr, rc, rr, beta=1 / (2 * cfg.ipo_margin))[0]
    if method == "reinforce":
        m = r.mean().item()
        state["b"] = m if "b" not in state else 0.9 * state["b"] + 0.1 * m
        s, _ = ift.seq_logps(model, seq_rows(prompts, ys))
        return -((r.flatten().float() - state["b"]) * s).mean()
    if method in ("ppo", "grpo"):
        batch = seq_rows(prompts, ys)
        if state.get("fresh", True):   # the drawing policy's log-probs: once per draw, before any update
            with torch.no_grad():
                state["old_lp"] = ift.token_logps(model, batch)[0]
                state["ref_lp"] = ift.token_logps(ref, batch)[0]
        adv = pg_advantages(method, r, state)
        lp, m = ift.token_logps(model, batch)
        return ift.clipped_pg_loss(lp, state["old_lp"], m, adv, state["ref_lp"], clip_low=cfg.clip,
                                   clip_high=cfg.clip, kl_coef=cfg.pg_kl,
                                   kl_estimator="logratio" if method == "ppo" else "k3")[0]
    raise ValueError(method)


def seq_arm(method, onpolicy, centre, cfg, seed, ref):
    L, R = cfg.seq_len, reward(centre)
    model = copy.deepcopy(ref).train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.seq_lr)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, K, (cfg.seq_prompts,), generator=g).tolist()
    data = seq_sample(ref, prompts, cfg.n, L, seed, R)     # offline set = on-policy's first draw
    curve, state = [seq_expected_reward(model, L, R, 10_000 + seed)], {"fresh": True}
    for t in range(cfg.seq_steps):
        if onpolicy and t > 0 and t % cfg.every == 0:
            data = seq_sample(model, prompts, cfg.n, L, seed * 100_003 + t, R)
            state["fresh"] = True
        loss = seq_loss(method, model, ref, *data, cfg, state)
        if loss is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    curve.append(seq_expected_reward(model, L, R, 10_000 + seed))
    return curve


def seq_experiment(cfg, methods=("sft", "ift", "dpo", "ipo", "reinforce", "ppo", "grpo"),
                   rewards=tuple(REWARDS)):
    """{(reward, method, mode): [E_pi[R] per seed]}; (reward, "ref", "-") holds the reference's value."""
    out = {}
    for s in range(cfg.seq_seeds):
        ref = fit_reference(seq_model(s, cfg.seq_len), cfg.seq_len, 150 if cfg.quick else 400, s).eval()
        ref.requires_grad_(False)
        for rname in rewards:
            c = REWARDS[rname]
            out.setdefault((rname, "ref", "-"), []).append(seq_expected_reward(ref, cfg.seq_len, reward(c), 10_000 + s))
            for m in methods:
                for mode in ("offline", "onpolicy"):
                    out.setdefault((rname, m, mode), []).append(seq_arm(m, mode == "onpolicy", c, cfg, s, ref)[-1])
    return out


def report_seq(cfg, r):
    print(f"\nSequence bandit (model.py, L={cfg.seq_len}, {cfg.seq_prompts} prompts x N={cfg.n}, {cfg.seq_steps} "
          f"Adam steps at lr {cfg.seq_lr}, {cfg.seq_seeds} seeds): E_pi[mean_t R(y_t)]")
    print(f"{'reward':<7} {'method':<10} {'offline':>15} {'on-policy':>15}")
    for (rname, m, mode), v in r.items():
        if m == "ref":
            print(f"{rname:<7} {'pi_ref':<10} {fmt(v):>15}")
        elif mode == "offline":
            print(f"{rname:<7} {m:<10} {fmt(v):>15} {fmt(r[rname, m, 'onpolicy']):>15}")


def plot(cfg, curves, r2):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    color = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for _, m, _ in curves))}
    for i, rname in enumerate(REWARDS):
        for (rn, m, mode), c in curves.items():
            if rn == rname:
                ax[i].plot(c, ls="-" if mode == "onpolicy" else "--", c=color[m], label=f"{m} {mode}")
        ax[i].set(xlabel="gradient step", ylabel="E_π[R]", title=f"E1: {rname}", ylim=(0, 1))
        ax[i].legend(fontsize=7)
    P = list(r2)
    for key, lab in (("h_w", "h(y_w)"), ("h_l", "h(y_l)"), ("margin", "margin")):
        ax[2].errorbar(P, [stats(r2[p][key])[0] for p in P], [stats(r2[p][key])[1] for p in P], marker="o", label=lab)
    ax[2].axhline(0, c="grey", lw=0.5)
    ax[2].set(xscale="log", xlabel="number of prompts", ylabel="log π − log π_ref",
              title="E2: offline DPO on R_far, implicit rewards")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(cfg.out, dpi=120)
    print(f"saved {cfg.out}")


def parse(argv=None) -> Config:
    cfg = flags.parse_dataclass(Config, argv, __doc__.split("\n\n")[0])
    if cfg.quick:   # test size for the sequence bandit
        cfg.seq_steps, cfg.seq_seeds, cfg.seq_prompts = 20, 2, 4
    return cfg


if __name__ == "__main__":
    torch.set_num_threads(1)   # tensors of 100 entries: extra threads only add synchronisation
    cfg = parse()
    t0 = time.time()
    r1, curves = e1(cfg)
    r2 = e2(cfg)
    report_tab(cfg, r1, r2)
    if cfg.plot:
        plot(cfg, curves, r2)
    print(f"({time.time() - t0:.1f} s)")
    if cfg.seq:
        t0 = time.time()
        report_seq(cfg, seq_experiment(cfg))
        print(f"({time.time() - t0:.1f} s)")
