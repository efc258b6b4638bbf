"""
Frozen Lake: the IFT paper's didactic check (Hua et al. 2025, §5.3; METHOD §8), re-created.

The paper publishes no grid, code or numbers, only an ordering of how close each method's trained
policy gets to the optimal one: DPO > IFT > ORPO > SFT. This file rebuilds the setting and reports
whatever comes out:
  * a fixed 5x5 deterministic (non-slippery) grid with one goal, a unique short optimal path (6 moves,
    along the top) and a longer sub-optimal path (10 moves, down the left edge and round the lake);
  * pi* by value iteration; a two-layer MLP (one-hot state -> Linear -> ReLU -> Linear -> 4 logits);
  * the "optimal parameterised policy" theta*: pi* distilled into the MLP from a random init theta0;
  * every method fine-tunes theta0 (also DPO/IPO's reference) with the same optimizer, lr and steps:
      SFT, IFT        on the optimal trajectory
      DPO, IPO, ORPO, SimPO  on (optimal = chosen, sub-optimal = rejected)
    and every loss is computed by ift.py (SFT = ift_objective with gamma = 0 on unmixed inputs);
  * distance to theta*: MSE of the state-action probability tables (paper v3) and of the parameters
    (paper v1), mean and spread over seeds (a seed draws theta0).
IFT here: a trajectory is a "sequence" whose tokens are states. Its mixed input at step t is
(1-lam)*onehot(s*_t) + lam*onehot(s'_t), s'_t = where the policy's own greedy action from s*_{t-1}
leads (the guess of "token t" given the true prefix, as METHOD §1.1), and the per-step log-probs of the
optimal actions get ift.py's relation-propagation weighting.

    python -m experiments.frozen_lake                 # table, 5 seeds, a few seconds
    python -m experiments.frozen_lake --plot          # + frozen_lake.png (curves, greedy paths); needs matplotlib
    python -m experiments.frozen_lake --sweep         # the choices the paper leaves open: start, lr, steps, metric
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import ift
from infra import flags

# S start, . frozen, H hole, G goal. Optimal (6 moves): R R R R D D along the top. Sub-optimal (10 moves):
# D D D D R R R R U U round the lake. The two share only the start state, so neither kind of objective gets
# states for free: a shared suffix would carry no DPO signal at all (its log-probs cancel in the margin).
GRID = ["S....",
        ".HHH.",
        ".H.HG",
        ".H.H.",
        "....."]
ACTIONS = "LDRU"                                   # gym's FrozenLake order
MOVES = [(0, -1), (1, 0), (0, 1), (-1, 0)]
OPTIMAL_ACTIONS = [2, 2, 2, 2, 1, 1]
SUBOPTIMAL_ACTIONS = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
METHODS = ("SFT", "IFT", "DPO", "IPO", "ORPO", "SimPO")


@dataclass
class Config:
    seeds: int = 5
    steps: int = 200              # gradient steps, the same for every method
    lr: float = 1e-2              # Adam, the same for every method
    hidden: int = 32
    distill_steps: int = 1000     # theta0 -> theta* (pi* distilled into the MLP)
    lam: float = 0.2              # IFT λ (METHOD §1.4 default)
    gamma: float = 0.95           # IFT γ
    beta_dpo: float = 0.1
    beta_ipo: float = 0.1
    beta_orpo: float = 0.25
    beta_simpo: float = 2.0
    discount: float = 0.9         # value iteration
    start: str = "random"         # theta0: random (a fresh init) | perturbed (theta* + noise)
    perturb: float = 0.5          # perturbed start: noise std, in units of each layer's init bound 1/sqrt(fan_in)
    distill_lr: float = 0.0       # lr of the distillation into theta*; 0 = lr
    plot: bool = False
    sweep: bool = False
    out: str = "frozen_lake.png"

# ----------------------------------------------------------------------------- environment


def cells(grid=GRID):
    return len(grid), len(grid[0])


def step(s: int, a: int, grid=GRID) -> int:
    """Deterministic move; bumping into the border leaves you in place."""
    H, W = cells(grid)
    r, c = divmod(s, W)
    dr, dc = MOVES[a]
    r, c = min(max(r + dr, 0), H - 1), min(max(c + dc, 0), W - 1)
    return r * W + c


def terminal(s: int, grid=GRID) -> bool:
    W = cells(grid)[1]
    return grid[s // W][s % W] in "HG"


def value_iteration(grid=GRID, discount=0.9, tol=1e-12):
    """V*, Q* and the soft greedy pi* (uniform over tied best actions; zero rows at terminals).
    Reward 1 for entering G, 0 otherwise; holes and the goal end the episode."""
    H, W = cells(grid)
    n = H * W
    V = torch.zeros(n, dtype=torch.float64)
    while True:
        Q = torch.zeros(n, 4, dtype=torch.float64)
        for s in range(n):
            if terminal(s, grid):
                continue
            for a in range(4):
                s2 = step(s, a, grid)
                goal = grid[s2 // W][s2 % W] == "G"
                Q[s, a] = (1.0 if goal else 0.0) + (0.0 if terminal(s2, grid) else discount * V[s2])
        V2 = Q.max(1).values
        if (V2 - V).abs().max() < tol:
            break
        V = V2
    best = (Q >= Q.max(1, keepdim=True).values - 1e-9) & ~torch.tensor([terminal(s, grid) for s in range(n)])[:, None]
    pi = best.double() / best.sum(1, keepdim=True).clamp(min=1)
    return V, Q, pi


def rollout(actions, grid=GRID):
    """States visited before each action, from S."""
    W = cells(grid)[1]
    s = next(r * W + c for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == "S")
    states = []
    for a in actions:
        states.append(s)
        s = step(s, a, grid)
    return states, s


def greedy_path(policy_fn, grid=GRID, max_len=30):
    """Follow argmax actions from S until a terminal or max_len: (states incl. the last, reached goal?)."""
    W = cells(grid)[1]
    s = next(r * W + c for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == "S")
    path = [s]
    while not terminal(s, grid) and len(path) <= max_len:
        s = step(s, int(policy_fn(s)), grid)
        path.append(s)
    return path, grid[s // W][s % W] == "G"

# ----------------------------------------------------------------------------- policy


def make_policy(n_states, hidden, seed):
    """Two-layer MLP; PyTorch's default uniform(±1/sqrt(fan_in)) init, drawn from a local generator."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_states, hidden), nn.ReLU(), nn.Linear(hidden, 4)).double()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            bound = 1 / layer.in_features ** 0.5
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    return net


def table(net, n_states):
    """pi(a|s) for every state, [S, 4]."""
    with torch.no_grad():
        return net(torch.eye(n_states, dtype=torch.float64)).softmax(-1)


def distill(net, pi_star, steps, lr):
    """theta*: fit pi* (soft targets) on every non-terminal state, cross-entropy, Adam."""
    live = pi_star.sum(1) > 0
    x, target = torch.eye(len(pi_star), dtype=torch.float64)[live], pi_star[live]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = -(target * net(x).log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net

# ----------------------------------------------------------------------------- objectives (all via ift.py)


def traj_logps(net, states, actions, n_states, mix=None, lam=0.0):
    """Per-step log pi(a_t | input_t), [T]. mix: per-step states to blend into the input with weight lam."""
    x = F.one_hot(torch.tensor(states), n_states).double()
    if mix is not None:
        x = (1 - lam) * x + lam * F.one_hot(torch.tensor(mix), n_states).double()
    return net(x).log_softmax(-1).gather(-1, torch.tensor(actions)[:, None])[:, 0]


def ift_guess_states(net, states, n_states):
    """s'_t: where the policy's greedy action from the true s*_{t-1} leads; s'_0 = s*_0 (the 'prompt')."""
    with torch.no_grad():
        greedy = net(F.one_hot(torch.tensor(states), n_states).double()).argmax(-1).tolist()
    return [states[0]] + [step(s, a) for s, a in zip(states[:-1], greedy[:-1])]


def method_loss(method, net, ref, data, cfg, n_states):
    (so, ao), (sr, ar) = data["chosen"], data["rejected"]
    if method in ("SFT", "IFT"):
        mix = ift_guess_states(net, so, n_states) if method == "IFT" else None
        lp = traj_logps(net, so, ao, n_states, mix, cfg.lam)[None]
        m = torch.ones_like(lp, dtype=torch.bool)
        # SFT = gamma 0 (all weights 1) on the unmixed input: exactly the per-sequence mean NLL (METHOD §1.1)
        return ift.ift_objective(lp, m, cfg.gamma if method == "IFT" else 0.0)[0]
    lc, lr_ = traj_logps(net, so, ao, n_states), traj_logps(net, sr, ar, n_states)
    if method in ("DPO", "IPO"):
        with torch.no_grad():
            rc, rr = traj_logps(ref, so, ao, n_states).sum(), traj_logps(ref, sr, ar, n_states).sum()
        f = ift.dpo_loss if method == "DPO" else ift.ipo_loss
        beta = cfg.beta_dpo if method == "DPO" else cfg.beta_ipo
        return f(lc.sum()[None], lr_.sum()[None], rc[None], rr[None], beta=beta)[0]
    if method == "ORPO":
        return ift.orpo_loss(lc.mean()[None], lr_.mean()[None], beta=cfg.beta_orpo)[0]
    if method == "SimPO":
        return ift.simpo_loss(lc.mean()[None], lr_.mean()[None], beta=cfg.beta_simpo)[0]
    raise ValueError(f"unknown method {method!r}")


def distances(net, star, n_states, live):
    tab = ((table(net, n_states) - table(star, n_states))[live] ** 2).mean().item()
    par = torch.cat([(p - q).flatten() for p, q in zip(net.parameters(), star.parameters())])
    return tab, (par ** 2).mean().item()


def finetune(method, theta0, star, data, cfg, n_states, live):
    """Fine-tune a copy of theta0; returns (net, [(table_mse, param_mse)] at every step incl. 0)."""
    net = make_policy(n_states, cfg.hidden, 0)
    net.load_state_dict(theta0.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    curve = [distances(net, star, n_states, live)]
    for _ in range(cfg.steps):
        loss = method_loss(method, net, theta0, data, cfg, n_states)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(distances(net, star, n_states, live))
    return net, curve


def start_policy(cfg, star, n_states, seed):
    """theta0: the seed's random init (the one theta* was distilled from), or theta* plus Gaussian noise of
    std perturb / sqrt(fan_in) per layer (drawn from its own generator)."""
    net = make_policy(n_states, cfg.hidden, seed)
    if cfg.start == "random":
        return net
    if cfg.start != "perturbed":
        raise ValueError(f"start must be 'random' or 'perturbed', got {cfg.start!r}")
    net.load_state_dict(star.state_dict())
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for layer in (net[0], net[2]):
            for p in (layer.weight, layer.bias):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * cfg.perturb / layer.in_features ** 0.5)
    return net


def run(cfg: Config, methods=METHODS):
    """All methods x seeds. Returns {method: {"table": [per seed], "param": [...], "curves": [...],
    "paths": [...], "optimal_path": [bool per seed]}} and the distilled nets per seed."""
    H, W = cells()
    n_states = H * W
    _, _, pi_star = value_iteration(discount=cfg.discount)
    live = pi_star.sum(1) > 0
    so, _ = rollout(OPTIMAL_ACTIONS)
    sr, _ = rollout(SUBOPTIMAL_ACTIONS)
    data = {"chosen": (so, OPTIMAL_ACTIONS), "rejected": (sr, SUBOPTIMAL_ACTIONS)}
    res = {m: {"table": [], "param": [], "curves": [], "paths": [], "optimal_path": []} for m in methods}
    stars = []
    for seed in range(cfg.seeds):
        star = make_policy(n_states, cfg.hidden, seed)        # theta0's random init, then distilled
        distill(star, pi_star, cfg.distill_steps, cfg.distill_lr or cfg.lr)
        stars.append(star)
        theta0 = start_policy(cfg, star, n_states, seed)
        for m in methods:
            net, curve = finetune(m, theta0, star, data, cfg, n_states, live)
            path, _ = greedy_path(lambda s: net(F.one_hot(torch.tensor(s), n_states).double()).argmax())
            r = res[m]
            r["table"].append(curve[-1][0])
            r["param"].append(curve[-1][1])
            r["curves"].append(curve)
            r["paths"].append(path)
            r["optimal_path"].append(path == so + [rollout(OPTIMAL_ACTIONS)[1]])
    return res, stars


def mean_spread(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(xs) > 1 else 0.0)


def report(res, cfg):
    print(f"Frozen Lake {cells()[0]}x{cells()[1]}, {cfg.seeds} seeds, {cfg.steps} Adam steps at lr {cfg.lr}, "
          f"distance to the distilled optimal policy (lower = closer; mean ± std over seeds)")
    print(f"{'method':<7} {'table MSE':>22} {'param MSE':>22} {'greedy path optimal':>20}")
    for m, r in res.items():
        (tm, ts), (pm, ps) = mean_spread(r["table"]), mean_spread(r["param"])
        print(f"{m:<7} {tm:>12.5f} ± {ts:<8.5f} {pm:>12.5f} ± {ps:<8.5f} {sum(r['optimal_path']):>12}/{cfg.seeds}")
    for key, name in (("table", "table MSE"), ("param", "param MSE")):
        order = sorted(res, key=lambda m: mean_spread(res[m][key])[0])
        print(f"order by {name} (closest first): {' > '.join(order)}")
    # The order depends on the budget (DPO's margin is unbounded): show it along the way too.
    marks = sorted({max(1, cfg.steps // 8), max(1, cfg.steps // 4), max(1, cfg.steps // 2)})
    for k in marks:
        order = sorted(res, key=lambda m: sum(c[k][0] for c in res[m]["curves"]))
        print(f"  at step {k:>4}, by table MSE: {' > '.join(order)}")
    print("paper (Hua et al. 2025, §5.3): DPO > IFT > ORPO > SFT")


# ----------------------------------------------------------------------------- sweep over the unpublished choices

PAPER_ORDER = ("DPO", "IFT", "ORPO", "SFT")   # closest to theta* first
SWEEP = {"starts": ("random", "perturbed"), "lrs": (1e-3, 1e-2, 3e-2), "steps": (25, 100, 200), "seeds": 5,
         "distill_steps": 1000, "distill_lr": 1e-2}
SWEEP_QUICK = {"starts": ("random", "perturbed"), "lrs": (1e-2,), "steps": (2, 5), "seeds": 2,
               "distill_steps": 20, "distill_lr": 1e-2}


def sweep(spec=SWEEP, methods=METHODS):
    """Every (start, lr, steps, metric): the order of the seed-mean distances, whether the paper's
    DPO > IFT > ORPO > SFT holds for the means and in how many seeds, and in how many seeds SFT is closer
    than IFT. One run per (start, lr) at the largest step count: Adam at a constant lr, so the distance
    after k steps of it is the distance a k-step run ends at. theta* is distilled at one fixed lr."""
    rows = []
    for start in spec["starts"]:
        for lr in spec["lrs"]:
            cfg = Config(seeds=spec["seeds"], steps=max(spec["steps"]), lr=lr, start=start,
                         distill_steps=spec["distill_steps"], distill_lr=spec["distill_lr"])
            res, _ = run(cfg, methods)
            for k in spec["steps"]:
                for i, metric in enumerate(("table", "param")):
                    d = {m: [c[k][i] for c in res[m]["curves"]] for m in methods}
                    mean = {m: sum(v) / len(v) for m, v in d.items()}
                    holds = lambda x: all(x[a] < x[b] for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))  # noqa: E731
                    rows.append({"start": start, "lr": lr, "steps": k, "metric": metric, "mean": mean,
                                 "order": sorted(methods, key=mean.get), "paper_order": holds(mean),
                                 "paper_order_seeds": sum(holds({m: d[m][s] for m in methods}) for s in range(cfg.seeds)),
                                 "sft_closer_than_ift_seeds": sum(a < b for a, b in zip(d["SFT"], d["IFT"])),
                                 "seeds": cfg.seeds})
    return rows


def sweep_markdown(rows):
    n = rows[0]["seeds"] if rows else 0
    out = [f"**Frozen Lake sweep** ({n} seeds per setting; order = seed-mean distance to θ*, closest first; "
           f"paper = seeds in which DPO > IFT > ORPO > SFT holds; SFT<IFT = seeds in which SFT ends closer than IFT)", "",
           "| start | lr | steps | metric | order | paper order (mean) | paper (seeds) | SFT<IFT (seeds) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['start']} | {r['lr']:g} | {r['steps']} | {r['metric']} MSE | {' > '.join(r['order'])} | "
                   f"{'yes' if r['paper_order'] else 'no'} | {r['paper_order_seeds']}/{r['seeds']} | "
                   f"{r['sft_closer_than_ift_seeds']}/{r['seeds']} |")
    hits = [r for r in rows if r["paper_order"]]
    first = sum(r["order"][0] == "SFT" for r in rows)
    out += ["", f"Paper's ordering (by the means) in {len(hits)} of {len(rows)} settings"
            + (": " + "; ".join(f"{r['start']} lr {r['lr']:g} {r['steps']} steps {r['metric']}" for r in hits) if hits else "")
            + f". SFT closest of all in {first} of {len(rows)}; SFT closer than IFT (means) in "
            f"{sum(r['mean']['SFT'] < r['mean']['IFT'] for r in rows)} of {len(rows)}.", ""]
    return "\n".join(out)


def plot(res, cfg):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib")
        return
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for m, r in res.items():
        c = torch.tensor(r["curves"])                         # [seeds, steps+1, 2]
        for i in range(2):
            ax[i].plot(c[:, :, i].mean(0), label=m)
    for i, name in enumerate(("state-action table MSE", "parameter MSE")):
        ax[i].set(xlabel="gradient step", ylabel=name, yscale="log", title=f"distance to π* ({name})")
        ax[i].legend()
    H, W = cells()
    colors = {"S": "#9ecae1", ".": "#f7fbff", "H": "#08306b", "G": "#31a354"}
    for r_ in range(H):
        for c_ in range(W):
            ch = GRID[r_][c_]
            ax[2].add_patch(plt.Rectangle((c_, r_), 1, 1, color=colors[ch], ec="grey"))
            ax[2].text(c_ + .05, r_ + .25, ch if ch != "." else "", color="w" if ch == "H" else "k")
    for k, (m, r) in enumerate(res.items()):
        off = (k - len(res) / 2) * 0.06
        path = r["paths"][0]
        ax[2].plot([p % W + .5 + off for p in path], [p // W + .5 + off for p in path], "-o", ms=3, label=m)
    ax[2].set(xlim=(0, W), ylim=(H, 0), aspect="equal", title="greedy paths (seed 0)")
    ax[2].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(cfg.out, dpi=120)
    print(f"saved {cfg.out}")


def parse(argv=None) -> Config:
    return flags.parse_dataclass(Config, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    torch.set_num_threads(1)   # tensors of 25 x 32: extra threads only add synchronisation
    cfg = parse()
    t0 = time.time()
    if cfg.sweep:
        print(sweep_markdown(sweep()))
        print(f"({time.time() - t0:.1f} s)")
        raise SystemExit
    res, _ = run(cfg)
    report(res, cfg)
    if cfg.plot:
        plot(res, cfg)
    print(f"({time.time() - t0:.1f} s)")
