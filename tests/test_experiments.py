"""Tests for the didactic experiments: frozen_lake.py (IFT paper §5.3) and bandit.py (Tajwar et al. §4).
Expected values are hand-derived (path lengths, discounted returns, closed-form bin masses with `math`),
or the claims of docs/METHOD.md §3.3 (E1/E2) asserted on means over >= 5 seeds with the issue's margins."""
import math

import pytest
import torch
import torch.nn.functional as F

import ift
from experiments import bandit as bd, frozen_lake as fl


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of ~100 entries: a second thread only adds synchronisation on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Count calls of ift.py's objectives while letting them run."""
    calls = {}
    for name in ("ift_objective", "dpo_loss", "ipo_loss", "orpo_loss", "simpo_loss", "sft_loss", "ift_loss",
                 "seq_logps", "clipped_pg_loss"):
        real = getattr(ift, name)

        def wrap(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(ift, name, wrap)
    return calls

# ----------------------------------------------------------------------------- Frozen Lake


def test_value_iteration_gives_the_known_optimal_path():
    V, Q, pi = fl.value_iteration(discount=0.9)
    start = 0
    assert V[start].item() == pytest.approx(0.9 ** 5, abs=1e-9)     # 6 moves, reward 1 on entering G
    # greedy pi* from S follows R R R R D D into G, and pi* is deterministic along it
    path, reached = fl.greedy_path(lambda s: int(pi[s].argmax()))
    assert reached and path == [0, 1, 2, 3, 4, 9, 14]
    assert all(pi[s].max().item() == 1.0 for s in path[:-1])
    so, end_o = fl.rollout(fl.OPTIMAL_ACTIONS)
    sr, end_r = fl.rollout(fl.SUBOPTIMAL_ACTIONS)
    assert so == path[:-1] and end_o == end_r == 14                 # both trajectories end in G
    assert len(fl.SUBOPTIMAL_ACTIONS) == 10 and not any(fl.terminal(s) for s in sr)
    assert set(so) & set(sr) == {0}                                  # they share only the start state
    # Q*(S, Down) = 0.9^7: the best continuation from (1,0) is back Up and along the top (7 moves in all);
    # the sub-optimal trajectory itself returns 0.9^9
    assert Q[0, 1].item() == pytest.approx(0.9 ** 7, abs=1e-9) and Q[0, 2].item() == pytest.approx(0.9 ** 5)
    assert pi[5].tolist() == [0, 0, 0, 1]
    assert pi[[6, 7, 8, 11, 13, 16, 18, 14]].sum().item() == 0       # holes and goal: no action


def test_distilled_policy_greedy_path_is_optimal():
    _, _, pi = fl.value_iteration()
    live = pi.sum(1) > 0
    for seed in range(3):
        net = fl.distill(fl.make_policy(25, 32, seed), pi, 1000, 1e-2)
        path, reached = fl.greedy_path(lambda s: net(F.one_hot(torch.tensor(s), 25).double()).argmax())
        assert reached and path == [0, 1, 2, 3, 4, 9, 14]
        assert ((fl.table(net, 25) - pi)[live] ** 2).mean().item() < 1e-3


def test_ift_mixed_input_and_sft_by_hand():
    cfg = fl.Config(lam=0.3, gamma=0.95)
    net = fl.make_policy(25, 8, 0)
    so, ao = fl.rollout(fl.OPTIMAL_ACTIONS)[0], fl.OPTIMAL_ACTIONS
    sr, ar = fl.rollout(fl.SUBOPTIMAL_ACTIONS)[0], fl.SUBOPTIMAL_ACTIONS
    data = {"chosen": (so, ao), "rejected": (sr, ar)}
    # s'_t = where the greedy action from the TRUE previous state leads
    with torch.no_grad():
        greedy = [int(net(F.one_hot(torch.tensor(s), 25).double()).argmax()) for s in so]
    guess = [so[0]] + [fl.step(s, a) for s, a in zip(so[:-1], greedy[:-1])]
    assert fl.ift_guess_states(net, so, 25) == guess
    onehot = lambda s: F.one_hot(torch.tensor(s), 25).double()
    x = torch.stack([(1 - cfg.lam) * onehot(s) + cfg.lam * onehot(g) for s, g in zip(so, guess)])
    lp = net(x).log_softmax(-1)[torch.arange(len(ao)), torch.tensor(ao)]
    # METHOD §1.2 left/L1 weights by a Python loop: S_t = sum_{j>=t} γ^(j-t) (-lp_j / n), rescaled to sum n
    n, nll = len(ao), (-lp).tolist()
    S = [sum(cfg.gamma ** (j - t) * nll[j] / n for j in range(t, n)) for t in range(n)]
    w = [s_ * n / sum(S) for s_ in S]
    expect = sum(l_ * w_ for l_, w_ in zip(nll, w)) / n
    assert fl.method_loss("IFT", net, net, data, cfg, 25).item() == pytest.approx(expect, rel=1e-10)
    # SFT: plain mean NLL on the true states
    lp0 = net(F.one_hot(torch.tensor(so), 25).double()).log_softmax(-1)[torch.arange(n), torch.tensor(ao)]
    assert fl.method_loss("SFT", net, net, data, cfg, 25).item() == pytest.approx(-lp0.mean().item(), rel=1e-12)
    # DPO at the reference: ln 2
    assert fl.method_loss("DPO", net, net, data, cfg, 25).item() == pytest.approx(math.log(2), rel=1e-12)


def test_frozen_lake_every_loss_goes_through_ift(spy):
    cfg = fl.Config(seeds=1, steps=3, distill_steps=5)
    expect = {"SFT": "ift_objective", "IFT": "ift_objective", "DPO": "dpo_loss", "IPO": "ipo_loss",
              "ORPO": "orpo_loss", "SimPO": "simpo_loss"}
    for m, fn in expect.items():
        spy.clear()
        fl.run(cfg, methods=(m,))
        assert spy == {fn: cfg.steps}, m


def test_frozen_lake_small_run_is_deterministic_and_sft_learns():
    cfg = fl.Config(seeds=2, steps=60, distill_steps=400)
    a, _ = fl.run(cfg, methods=("SFT", "IFT", "DPO", "ORPO"))
    b, _ = fl.run(cfg, methods=("SFT", "IFT", "DPO", "ORPO"))
    for m in a:
        assert a[m]["table"] == b[m]["table"] and a[m]["param"] == b[m]["param"]
        assert all(math.isfinite(x) for x in a[m]["table"] + a[m]["param"])
    for m in ("SFT", "IFT"):   # trained on the optimal trajectory: closer than the random start, greedy optimal
        assert all(c[-1][0] < c[0][0] for c in a[m]["curves"])
        assert all(a[m]["optimal_path"])

# ----------------------------------------------------------------------------- tabular bandit


def test_bandit_reference_start_values():
    p = bd.ref_probs()
    # independent closed form with math: F(x) = 1/2 + atan((x - x0)/s)/pi, edges atanh(±1) = ±inf
    Fc = lambda x: 0.5 + math.atan((x + 0.7) / 0.4) / math.pi
    edge = lambda e: math.inf if e >= 1 else (-math.inf if e <= -1 else math.atanh(e))
    q = [Fc(edge(-1 + 2 * (a + 1) / 100)) - Fc(edge(-1 + 2 * a / 100)) for a in range(100)]
    assert p.tolist() == pytest.approx(q, abs=1e-12) and sum(q) == pytest.approx(1.0, abs=1e-12)
    far = sum(qa * math.exp(-((a - 70) / 10) ** 2) for a, qa in enumerate(q))
    near = sum(qa * math.exp(-((a - 20) / 10) ** 2) for a, qa in enumerate(q))
    assert round(far, 3) == 0.039 and round(near, 3) == 0.377
    assert (p @ bd.reward(70)).item() == pytest.approx(far, abs=1e-12)
    assert (p @ bd.reward(20)).item() == pytest.approx(near, abs=1e-12)
    assert 14 <= int(p[1:99].argmax()) + 1 <= 17 and p[70].item() == pytest.approx(0.002, abs=5e-4)


def test_bandit_pairs_by_hand():
    y = torch.tensor([[3, 5, 7], [1, 1, 2]])
    r = torch.tensor([[0.1, 0.5, 0.2], [0.0, 0.0, 0.9]])
    p, w, l_ = bd.pairs(y, r, 0.2)
    got = sorted(zip(p.tolist(), w.tolist(), l_.tolist()))
    assert got == [(0, 5, 3), (0, 5, 7), (1, 2, 1), (1, 2, 1)]       # 7 vs 3 (gap 0.1) and 1 vs 1 skipped


def test_bandit_losses_go_through_ift(spy):
    cfg = bd.Config(steps=2, seeds=1, prompts=20)
    for m, fn in (("best_of_n", "ift_objective"), ("dpo", "dpo_loss"), ("ipo", "ipo_loss")):
        spy.clear()
        bd.train_table(m, True, 70, cfg, 0)
        assert spy == {fn: cfg.steps}, m


def test_bandit_ppo_grpo_clip_binds_offline_not_on_policy(spy):
    """Offline, one draw from pi_ref is reused for every step: a sample stops pulling once its ratio has passed
    the clip (only the softmax coupling and Adam's momentum move it on), so E[R] moves little; on-policy (a
    fresh draw every step, ratio 1) it climbs."""
    cfg = bd.Config(steps=40, seeds=1, prompts=20)
    for m in ("ppo", "grpo"):
        spy.clear()
        _, cv_off, _ = bd.train_table(m, False, 70, cfg, 0)
        _, cv_on, _ = bd.train_table(m, True, 70, cfg, 0)
        assert spy == {"clipped_pg_loss": 2 * cfg.steps}, m
        assert cv_on[-1] - cv_off[-1] > 0.2 and cv_off[-1] < 0.15, (m, cv_off[-1], cv_on[-1])   # 0.11 vs 0.41


def test_bandit_dpo_step0_and_best_of_n_closed_form():
    """At theta = log pi_ref DPO's loss is ln 2; best-of-N's table gradient is (pi - onehot(best)) / P."""
    cfg = bd.Config(prompts=3)
    lref = bd.ref_probs().log()
    y = torch.tensor([[0, 70, 99], [60, 65, 20], [1, 2, 3]])
    R = bd.reward(70)
    theta = lref.clone().requires_grad_(True)
    assert bd.tab_loss("dpo", theta.log_softmax(-1), lref, y, R[y], cfg, {}).item() == pytest.approx(math.log(2))
    bd.tab_loss("best_of_n", theta.log_softmax(-1), lref, y, R[y], cfg, {}).backward()
    expect = bd.ref_probs().clone()
    for b in (70, 65, 3):
        expect[b] -= 1 / 3
    assert theta.grad.tolist() == pytest.approx((expect).tolist(), abs=1e-12)


@pytest.fixture(scope="module")
def e1_results():
    cfg = bd.Config()          # the script's defaults: 5 seeds, 100 prompts x 10, 100 steps, lr 0.05
    assert cfg.seeds >= 5
    return bd.e1(cfg, methods=("best_of_n", "dpo", "ipo"))[0]


def mean(xs):
    return sum(xs) / len(xs)


def test_e1_onpolicy_beats_offline_most_where_reward_is_far(e1_results):
    r = e1_results
    for m in ("best_of_n", "dpo", "ipo"):
        gap_far = mean(r["R_far", m, "onpolicy"]) - mean(r["R_far", m, "offline"])
        gap_near = mean(r["R_near", m, "onpolicy"]) - mean(r["R_near", m, "offline"])
        assert gap_far >= 0.2, (m, gap_far)
        assert gap_far > gap_near, (m, gap_far, gap_near)


def test_e2_negative_gradient_beats_best_of_n_offline_on_far_reward(e1_results):
    r = e1_results
    bon_far, bon_near = mean(r["R_far", "best_of_n", "offline"]), mean(r["R_near", "best_of_n", "offline"])
    for m in ("dpo", "ipo"):
        assert mean(r["R_far", m, "offline"]) - bon_far >= 0.2, m
        assert mean(r["R_near", m, "offline"]) - bon_near < 0.2, m     # "... but not on R_near"


def test_e2_implicit_reward_of_preferred_turns_negative_with_many_prompts():
    cfg = bd.Config(e2_prompts="5,100")
    res = bd.e2(cfg)
    assert len(res[5]["h_w"]) >= 5
    assert mean(res[5]["h_w"]) > 0 and mean(res[100]["h_w"]) < 0
    assert mean(res[5]["margin"]) > 0 and mean(res[100]["margin"]) > 0


def test_bandit_is_deterministic():
    cfg = bd.Config(steps=20, prompts=10)
    a = bd.train_table("dpo", True, 70, cfg, 3)
    b = bd.train_table("dpo", True, 70, cfg, 3)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])

# ----------------------------------------------------------------------------- sequence bandit (model.py)


def test_sequence_bandit_quick(spy):
    cfg = bd.parse(["--seq", "--quick", "--seq_seeds=1"])
    out = bd.seq_experiment(cfg, methods=("sft", "ift", "dpo"), rewards=("R_far",))
    assert spy.get("sft_loss", 0) > 0 and spy.get("ift_loss", 0) > 0 and spy.get("dpo_loss", 0) > 0
    ref = out["R_far", "ref", "-"][0]
    assert abs(ref - 0.039) < 0.01                      # the fitted reference is pi_ref per token
    for k, v in out.items():
        assert all(math.isfinite(x) for x in v), k
    # on-policy best-of-N (no negative gradient) still climbs the far reward at this tiny size
    assert mean(out["R_far", "sft", "onpolicy"]) > ref + 0.1
    # best-of-N IFT is not best-of-N SFT here (answers are sequences): the two arms differ
    assert out["R_far", "ift", "offline"] != out["R_far", "sft", "offline"]
