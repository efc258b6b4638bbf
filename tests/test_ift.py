"""Tests for ift.py. Expected values come from METHOD §1.3, from hand formulas (math/numpy), or from a literal
loop transcription of METHOD §1.2 below; never from the function under test."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ift

KINDS, SIDES, NORMS = ("loss", "logps", "mask"), ("left", "right"), ("L1", "L2", "softmax", "log")
ALL_OPTIONS = list(itertools.product(KINDS, SIDES, NORMS))

# ----------------------------------------------------------------------------- oracles


def ref_weights(lp, m, gamma, kind, side, norm):
    """METHOD §1.2 transcribed literally with Python loops (float64 tensors, autograd-friendly, no in-place)."""
    B, T = lp.shape
    if gamma == 0:
        return m.double()
    rows_c = []
    for b in range(B):
        n = float(m[b].sum())
        rows_c.append([(1.0 if kind == "mask" else (-lp[b, t] / n if kind == "loss" else -lp[b, t]))
                       if m[b, t] else lp.new_zeros(()) for t in range(T)])
    sums = []
    for b in range(B):
        c, acc, out = rows_c[b], 0.0, [None] * T
        order = range(T - 1, -1, -1) if side == "left" else range(T)
        for t in order:
            acc = c[t] + gamma * acc
            out[t] = acc * 1.0 if torch.is_tensor(acc) else lp.new_tensor(acc)
        sums.append(torch.stack(out))
    X = torch.stack(sums)
    if side == "left":
        S = torch.where(m, X, 0.0)
        w = {"L1": S, "L2": S ** 2, "softmax": torch.softmax(S, -1), "log": torch.log(S + 1)}[norm]
    else:
        P = torch.where(m, X, 1e6)
        P = P + P[P != 0].min()
        w = {"L1": 1 / P, "L2": 1 / P ** 2, "softmax": torch.softmax(1 / P, -1), "log": 1 / torch.log(P + 1)}[norm]
    w = torch.where(m, w, 0.0)
    return w * m.sum(-1, keepdim=True) / w.sum(-1, keepdim=True)


def full_token_logps(logits, labels):
    """Oracle from full [B,T,V] logits: log p(labels[:, t+1]) at t, 0 where masked."""
    m = labels[:, 1:] != -100
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return torch.where(m, lp, 0.0), m


# ----------------------------------------------------------------------------- METHOD §1.3 worked example

M1 = torch.tensor([[0, 0, 1, 1, 1, 1, 0]]).bool()
NLL1 = torch.tensor([[0, 0, 2.0, 1.0, 0.5, 0.1, 0]], dtype=torch.float64)
ROW2_M = torch.tensor([[0, 1, 1, 1, 0, 0, 0]]).bool()
ROW2_NLL = torch.tensor([[0, 3.0, 3.0, 3.0, 0, 0, 0]], dtype=torch.float64)

SPEC_CASES = [  # (gamma, side, norm, weights, loss, d loss/d lp attached or None)
    (0.95, "left", "L1", [2.426896, 1.089393, 0.414112, 0.069599], 1.539300,
     [-0.686884, -0.254664, +0.094107, +0.420787]),
    (1.0, "left", "L1", [2.440678, 1.084746, 0.406780, 0.067797], 1.544068, None),
    (0.95, "left", "L2", [3.248244, 0.654508, 0.094576, 0.002671], 1.799638, None),
    (0.95, "left", "log", [2.237857, 1.178943, 0.495051, 0.088150], 1.477749, None),
    (0.95, "right", "L1", [1.194784, 0.975334, 0.909446, 0.920436], 0.977917,
     [-0.255512, -0.297492, -0.285001, -0.269016]),
]


@pytest.mark.parametrize("gamma,side,norm,w_exp,loss_exp,grad_exp", SPEC_CASES)
def test_spec_worked_example(gamma, side, norm, w_exp, loss_exp, grad_exp):
    lp = (-NLL1).clone().requires_grad_()
    loss, w = ift.ift_objective(lp, M1, gamma, "loss", side, norm)
    assert w[0, 2:6].tolist() == pytest.approx(w_exp, abs=1e-6)
    assert w[0, [0, 1, 6]].abs().sum() == 0
    assert loss.item() == pytest.approx(loss_exp, abs=1e-6)
    (g,) = torch.autograd.grad(loss, lp)
    if grad_exp is not None:
        assert g[0, 2:6].tolist() == pytest.approx(grad_exp, abs=1e-6)
    assert g[0, [0, 1, 6]].abs().sum() == 0
    # kind="logps": the final rescale cancels the 1/n (METHOD §1.3)
    w_logps = ift.propagation_weights(-NLL1, M1, gamma, "logps", side, norm)
    if norm in ("L1", "L2"):
        assert torch.allclose(w_logps, w.detach(), atol=1e-12)


def test_spec_detached_gradient_and_sft_reference():
    lp = (-NLL1).clone().requires_grad_()
    loss, w = ift.ift_objective(lp, M1, 0.95, detach_weights=True)
    assert w.grad_fn is None and loss.item() == pytest.approx(1.539300, abs=1e-6)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 2:6].tolist() == pytest.approx([-0.606724, -0.272348, -0.103528, -0.017400], abs=1e-6)
    # gamma = 0: weights exactly 1 on answer tokens, loss = SFT loss of the row (0.9), gradient -1/n
    loss0, w0 = ift.ift_objective(lp, M1, 0.0)
    assert torch.equal(w0, M1.double()) and loss0.item() == pytest.approx(0.9, abs=1e-12)
    (g0,) = torch.autograd.grad(loss0, lp)
    assert torch.equal(g0, -M1.double() / 4)


def test_spec_right_side_batch_coupling():
    lp = -torch.cat([NLL1, ROW2_NLL])
    m = torch.cat([M1, ROW2_M])
    w = ift.propagation_weights(lp, m, 0.95, "loss", "right", "L1")
    assert w[1, 1:4].tolist() == pytest.approx([1.456542, 0.891761, 0.651697], abs=1e-6)
    alone = ift.propagation_weights(-ROW2_NLL, ROW2_M, 0.95, "loss", "right", "L1")
    assert alone[0, 1:4].tolist() == pytest.approx([1.365430, 0.925715, 0.708854], abs=1e-6)
    assert w[0, 2:6].tolist() == pytest.approx([1.194784, 0.975334, 0.909446, 0.920436], abs=1e-6)
    for norm in NORMS:   # left side never couples rows
        wl = ift.propagation_weights(lp, m, 0.95, "loss", "left", norm)
        for b, (x, mm) in enumerate([(NLL1, M1), (ROW2_NLL, ROW2_M)]):
            assert torch.allclose(wl[b], ift.propagation_weights(-x, mm, 0.95, "loss", "left", norm)[0], atol=1e-12)


# ----------------------------------------------------------------------------- every option


def _random_case(seed, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 3 + 0.05)
    m = torch.rand(B, T, generator=g) < 0.7
    m[:, 0] = True   # every row non-empty; one row with a masked gap in the middle
    m[0, 4] = False
    return lp, m


@pytest.mark.parametrize("kind,side,norm", ALL_OPTIONS)
def test_weights_match_spec_transcription(kind, side, norm):
    lp, m = _random_case(1)
    for gamma in (0.0, 0.5, 0.95, 1.0):
        w = ift.propagation_weights(lp, m, gamma, kind, side, norm)
        assert torch.allclose(w, ref_weights(lp, m, gamma, kind, side, norm), rtol=1e-10, atol=1e-12)
        assert torch.allclose(w.sum(-1), m.sum(-1).double())
    # float masks are accepted (the authors' code crashes on bool/float mask mixes for kind="mask")
    assert torch.allclose(ift.propagation_weights(lp, m.float(), 0.9, kind, side, norm),
                          ift.propagation_weights(lp, m, 0.9, kind, side, norm))


@pytest.mark.parametrize("kind,side,norm", ALL_OPTIONS)
def test_weights_gradcheck_and_attached_objective(kind, side, norm):
    lp, m = _random_case(2, B=2, T=6)
    lp.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ift.propagation_weights(x, m, 0.9, kind, side, norm), (lp,))
    # the whole objective with attached weights: autograd through our code == autograd through the oracle
    loss, _ = ift.ift_objective(lp, m, 0.9, kind, side, norm)
    ref = ((-lp * ref_weights(lp, m, 0.9, kind, side, norm)).sum(-1) / m.sum(-1)).mean()
    g, gr = torch.autograd.grad(loss, lp)[0], torch.autograd.grad(ref, lp)[0]
    assert torch.allclose(loss, ref) and torch.allclose(g, gr, atol=1e-12)


def test_weights_ignore_masked_logps_and_empty_rows():
    lp, m = _random_case(3)
    lp2 = torch.where(m, lp, torch.full_like(lp, -1e30))   # garbage at masked positions must not leak
    m[2] = False                                           # an empty row: zeros, no NaN
    for kind, side, norm in ALL_OPTIONS:
        w = ift.propagation_weights(lp2, m, 0.95, kind, side, norm)
        assert torch.isfinite(w).all() and w[2].abs().sum() == 0
        assert torch.allclose(w, ift.propagation_weights(lp, m, 0.95, kind, side, norm))


# ----------------------------------------------------------------------------- discounted sums


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
def test_discounted_cumsum_vs_loop(gamma):
    rng = np.random.default_rng(0)
    for T in (1, 5, 64, 65, 1000, 4096):
        x = rng.random((2, T))
        pre, suf = np.zeros_like(x), np.zeros_like(x)
        acc = np.zeros(2)
        for t in range(T):
            acc = x[:, t] + gamma * acc
            pre[:, t] = acc
        acc = np.zeros(2)
        for t in reversed(range(T)):
            acc = x[:, t] + gamma * acc
            suf[:, t] = acc
        x32 = torch.tensor(x, dtype=torch.float32)
        for rev, exp in ((False, pre), (True, suf)):
            y = ift.discounted_cumsum(x32, gamma, reverse=rev)
            assert y.dtype == torch.float32
            np.testing.assert_allclose(y.numpy(), exp, rtol=1e-5)
    # signed inputs and extra batch dims (error relative to the magnitude of the sum)
    x = rng.standard_normal((2, 3, 300))
    y = ift.discounted_cumsum(torch.tensor(x, dtype=torch.float32), gamma, reverse=True).numpy()
    acc, scale = np.zeros((2, 3)), np.zeros((2, 3))
    for t in reversed(range(300)):
        acc, scale = x[..., t] + gamma * acc, np.abs(x[..., t]) + gamma * scale
        assert np.all(np.abs(y[..., t] - acc) <= 1e-5 * scale + 1e-7)


# ----------------------------------------------------------------------------- the IFT step on models


class TinyLM(nn.Module):
    """Stand-in with model.py's forward signature. Embeddings ~ I and lm_head ~ a shift by one, so without
    mixing the argmax at position t is (ids[t] + 1) % V by construction (the causal term weighs < 0.5).
    Records what each call received."""

    def __init__(self, V=11, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed_tokens = nn.Embedding(V, V)
        self.lm_head = nn.Linear(V, V, bias=False)
        self.alpha = nn.Parameter(torch.tensor(0.3))
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(V) + 0.01 * torch.randn(V, V, generator=g))
            self.lm_head.weight.copy_(torch.eye(V).roll(1, 0) * 4 + 0.01 * torch.randn(V, V, generator=g))
        self.calls = []

    def forward(self, input_ids, *, attention_mask=None, mix_ids=None, mix_lambda=0.0, freeze_embeddings=False,
                select=None):
        W = self.embed_tokens.weight.detach() if freeze_embeddings else self.embed_tokens.weight
        e = F.embedding(input_ids, W)
        if mix_ids is not None:
            e = (1 - mix_lambda) * e + mix_lambda * F.embedding(mix_ids, W)
        self.calls.append({"embeds": e.detach().clone(), "mix_ids": mix_ids, "lam": mix_lambda,
                           "select": select, "grad": torch.is_grad_enabled()})
        T = e.shape[1]
        prev_mean = (e.cumsum(1) - e) / torch.arange(T).clamp(min=1).to(e.dtype)[:, None]
        h = torch.tanh(e + self.alpha * prev_mean)
        h = h[select] if select is not None else h
        return self.lm_head(h)


def _sft_batch(V, seed=0, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100           # prompt
    labels[1, :5] = -100           # longer prompt
    labels[2, 8:] = -100           # right padding
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100) | (torch.arange(T) < 5)}


def test_ift_second_pass_inputs_are_the_hand_built_mix():
    model, V, lam = TinyLM().double(), 11, 0.3
    batch = _sft_batch(V)
    ids, labels = batch["input_ids"], batch["labels"]
    loss, met = ift.ift_loss(model, batch, lam=lam)
    first, second = model.calls
    m = labels[:, 1:] != -100
    # pass 1: no grad, no mix, logits only where the next label is supervised
    assert not first["grad"] and first["mix_ids"] is None
    assert torch.equal(first["select"], torch.cat([m, torch.zeros(3, 1, dtype=torch.bool)], 1))
    # hand-built x_hat: truth on prompt/pad positions, else the greedy guess made one position earlier
    x_hat = ids.clone()
    for b in range(3):
        for t in range(1, 10):
            if labels[b, t] != -100:
                x_hat[b, t] = (ids[b, t - 1] + 1) % V
    assert (x_hat != ids).any() and (x_hat == ids).any()
    assert second["grad"] and second["lam"] == lam and torch.equal(second["mix_ids"], x_hat)
    assert torch.equal(second["mix_ids"][labels == -100], ids[labels == -100])   # prompt positions untouched
    E = model.embed_tokens.weight.detach()
    assert torch.allclose(second["embeds"], (1 - lam) * E[ids] + lam * E[x_hat], atol=1e-14)
    truth_next = labels[:, 1:][m]
    assert met["guess_mismatch"].item() == pytest.approx((x_hat[:, 1:][m] != truth_next).double().mean().item())
    # loss = METHOD §1.1 step 7 on log-probs from full logits of the hand-built mix
    with torch.no_grad():
        model.calls.clear()
        lp, _ = full_token_logps(model(ids, mix_ids=x_hat, mix_lambda=lam), labels)
        lp0, _ = full_token_logps(model(ids), labels)
    w = ref_weights(lp, m, 0.95, "loss", "left", "L1")
    n = m.sum(-1)
    assert loss.item() == pytest.approx(((-lp * w).sum(-1) / n).mean().item(), abs=1e-12)
    assert met["nll_mixed"].item() == pytest.approx((-lp.sum(-1) / n).mean().item(), abs=1e-12)
    assert met["sft_loss"].item() == pytest.approx((-lp0.sum(-1) / n).mean().item(), abs=1e-12)
    assert met["lam"] == lam
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 0


def test_freeze_input_embeddings_and_lambda_zero_skips_first_pass():
    model = TinyLM().double()
    batch = _sft_batch(11)
    ift.ift_loss(model, batch, lam=0.2, freeze_input_embeddings=True)[0].backward()
    assert model.embed_tokens.weight.grad is None and model.lm_head.weight.grad.abs().sum() > 0
    model.calls.clear()
    loss, met = ift.ift_loss(model, batch, lam=0.0)
    assert len(model.calls) == 1 and "guess_mismatch" not in met and met["sft_loss"] == met["nll_mixed"]


def _tiny_transformer(dtype=torch.float64):
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, vocab_size=40,
                     sliding_window=None, max_position_embeddings=64)
    return Transformer(args).init_weights(std=0.3, seed=0).to(dtype)


def test_lambda0_gamma0_is_exactly_sft_on_transformer():
    model = _tiny_transformer(torch.float32)
    batch = _sft_batch(40, seed=1)
    l_sft, _ = ift.sft_loss(model, batch)
    l_sft.backward()
    g_sft = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    l_ift, met = ift.ift_loss(model, batch, lam=0.0, gamma=0.0)
    l_ift.backward()
    assert torch.equal(l_ift, l_sft)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), g_sft))
    # and both equal the oracle from full logits
    lp, m = full_token_logps(model(batch["input_ids"]), batch["labels"])
    assert l_sft.item() == pytest.approx((-lp.sum(-1) / m.sum(-1)).mean().item(), abs=1e-5)


def test_ift_on_transformer_matches_hand_built_mix():
    model, lam = _tiny_transformer(), 0.25
    batch = _sft_batch(40, seed=2)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        guess = model(ids).argmax(-1)
        x_hat = torch.where(labels == -100, ids, torch.cat([ids[:, :1], guess[:, :-1]], 1))
        E = model.embed_tokens.weight
        lp, m = full_token_logps(model(inputs_embeds=(1 - lam) * E[ids] + lam * E[x_hat]), labels)
    assert (x_hat != ids).any()
    for kind, side, norm in [("loss", "left", "L1"), ("mask", "right", "softmax")]:
        model.zero_grad()
        loss, met = ift.ift_loss(model, batch, lam=lam, kind=kind, side=side, norm=norm)
        w = ref_weights(lp, m, 0.95, kind, side, norm)
        assert loss.item() == pytest.approx(((-lp * w).sum(-1) / m.sum(-1)).mean().item(), abs=1e-10)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    ift.ift_loss(model, batch, lam=lam, freeze_input_embeddings=True)[0].backward()
    assert model.embed_tokens.weight.grad is None or model.embed_tokens.weight.grad.abs().sum() == 0


def test_ift_under_bf16_autocast_keeps_fp32_logps():
    model = _tiny_transformer(torch.float32)
    batch = _sft_batch(40, seed=4)
    ref, _ = ift.ift_loss(model, batch, lam=0.2, side="right", norm="softmax")
    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 logits: the checkpointed log-softmax path
        loss, met = ift.ift_loss(model, batch, lam=0.2, side="right", norm="softmax")
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_token_and_seq_logps_chunked_match_full_logits():
    model = _tiny_transformer()
    batch = _sft_batch(40, seed=3)
    lp_ref, m_ref = full_token_logps(model(batch["input_ids"]), batch["labels"])
    for chunk in (1, 3, 4096):
        lp, m = ift.token_logps(model, batch, chunk=chunk)
        assert lp.dtype == torch.float64 and torch.equal(m, m_ref)
        assert torch.allclose(lp, lp_ref, atol=1e-12)
    s, mean = ift.seq_logps(model, batch)
    assert torch.allclose(s, lp_ref.sum(-1), atol=1e-12)
    assert torch.allclose(mean, lp_ref.sum(-1) / m_ref.sum(-1), atol=1e-12)
    # a bf16 model still gives fp32 log-probs (upcast before the log-softmax)
    lp16, _ = ift.token_logps(model.to(torch.bfloat16), batch, chunk=5)
    assert lp16.dtype == torch.float32 and torch.allclose(lp16.double(), lp_ref, atol=0.1)


def test_label_logps_bf16_checkpoint_path_equals_plain():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(10, 17, generator=g) * 3).bfloat16().requires_grad_()
    y = torch.randint(0, 17, (10,), generator=g)
    out = ift.label_logps(x, y, chunk=4)
    out.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref = -F.cross_entropy(x2.float(), y, reduction="none")
    ref.square().sum().backward()
    assert out.dtype == torch.float32 and torch.equal(out, ref) and torch.equal(x.grad, x2.grad)


def test_first_pass_greedy_and_logps_match_one_pass_row_by_row():
    """IFT's pass 1 reads the logits a chunk of rows at a time: the same guesses and log-probs, bit for bit,
    as one max and label_logps over all rows, whatever the chunk (fp32, bf16 with ties, no rows)."""
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(13, 17, generator=g) * 3
    y = torch.randint(0, 17, (13,), generator=g)
    for x in (x32, x32.bfloat16(), x32.double()):
        ref_guess, ref_lp = x.max(-1).indices, ift.label_logps(x, y)
        for elems in (1, 17 * 4, 17 * 13, 1 << 22):        # 1 row, 4 rows (a ragged last chunk), all, default
            guess, lp = ift.greedy_and_label_logps(x, y, elems)
            assert torch.equal(guess, ref_guess) and torch.equal(lp, ref_lp) and lp.dtype == ref_lp.dtype
    guess, lp = ift.greedy_and_label_logps(torch.zeros(0, 17), y[:0])
    assert guess.shape == lp.shape == (0,)


def test_ift_loss_is_bit_identical_to_a_one_pass_first_pass(monkeypatch):
    """ift_loss (loss, gradients, metrics) equals the same step with pass 1 as one max + label_logps."""
    model = _tiny_transformer(torch.float32)
    batch = _sft_batch(40, seed=5)
    loss, met = ift.ift_loss(model, batch, lam=0.2)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(ift, "greedy_and_label_logps", lambda x, y: (x.max(-1).indices, ift.label_logps(x, y)))
    loss_ref, met_ref = ift.ift_loss(model, batch, lam=0.2)
    loss_ref.backward()
    assert torch.equal(loss, loss_ref) and all(torch.equal(p.grad, q) for p, q in zip(model.parameters(), grads))
    assert met.keys() == met_ref.keys() and all(torch.equal(torch.as_tensor(met[k]), torch.as_tensor(met_ref[k]))
                                                for k in met)


def test_empty_rows_convention():
    model = TinyLM().double()
    batch = _sft_batch(11)
    one = {k: v[:1] for k, v in batch.items()}
    with_empty = {k: v[:2].clone() for k, v in batch.items()}
    with_empty["labels"][1] = -100        # a row without any answer token: no loss, not counted
    assert ift.sft_loss(model, with_empty)[0].item() == pytest.approx(ift.sft_loss(model, one)[0].item(), abs=1e-14)
    assert ift.ift_loss(model, with_empty)[0].item() == pytest.approx(ift.ift_loss(model, one)[0].item(), abs=1e-14)
    empty = {k: v.clone() for k, v in batch.items()}
    empty["labels"][:] = -100
    for fn in (ift.sft_loss, ift.ift_loss, ift.dft_loss):
        loss, met = fn(model, empty)
        assert loss.item() == 0.0 and all(math.isfinite(float(v)) for v in met.values())
        loss.backward()                   # still a graph; grads zero, not NaN
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sft_token_mean():
    model = TinyLM().double()
    batch = _sft_batch(11)
    lp, m = full_token_logps(model(batch["input_ids"]), batch["labels"])
    assert ift.sft_loss(model, batch, token_mean=True)[0].item() == pytest.approx((-lp.sum() / m.sum()).item())


class FixedLogits(nn.Module):
    """A 'model' whose logits are a parameter: losses can be checked against hand-made probabilities."""

    def __init__(self, logits):
        super().__init__()
        self.z = nn.Parameter(logits)

    def forward(self, input_ids, *, attention_mask=None, select=None, **_):
        return self.z[select] if select is not None else self.z


def test_dft_worked_example_and_gradient():
    # Row 0 supervises 3 tokens with p = 0.5, 0.8, 0.1; row 1 one token with p = 0.25 (V = 3, float64).
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.45, 0.45, 0.1], [1 / 3] * 3],
                          [[1 / 3] * 3, [0.375, 0.375, 0.25], [1 / 3] * 3, [1 / 3] * 3]], dtype=torch.float64)
    model = FixedLogits(probs.log())
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, 0, 1, 2], [-100, -100, 2, -100]])}
    loss, met = ift.dft_loss(model, batch)
    # -p ln p per token: row 0 (0.346574 + 0.178515 + 0.230259) / 3 = 0.251782, row 1 0.25 ln 4 = 0.346574
    assert loss.item() == pytest.approx(0.299178, abs=1e-6)
    assert met["sft_loss"].item() == pytest.approx(1.229626, abs=1e-6)   # plain NLL: (ln2 - ln.8 + ln10)/3, ln4
    assert ift.dft_loss(model, batch, token_mean=True)[0].item() == pytest.approx(0.275480, abs=1e-6)
    loss.backward()
    g = model.z.grad
    # d/dz of sg(p) (-log p) = p (softmax - onehot), times 1/(n_b * rows): the weight p is not differentiated
    assert g[0, 0].tolist() == pytest.approx([-0.5 / 12, 0.25 / 12, 0.25 / 12], abs=1e-12)
    assert g[1, 1].tolist() == pytest.approx([0.046875, 0.046875, -0.09375], abs=1e-12)
    assert g[0, 3].abs().sum() == 0 and g[1, [0, 2, 3]].abs().sum() == 0
    # every token: p_t times SFT's gradient of that token (same reduction)
    model.zero_grad()
    ift.sft_loss(model, batch)[0].backward()
    p_t = torch.tensor([[0.5, 0.8, 0.1, 0], [0, 0.25, 0, 0]], dtype=torch.float64)
    assert torch.allclose(g, p_t[..., None] * model.z.grad, atol=1e-12)


# ----------------------------------------------------------------------------- lambda schedule


def test_lambda_schedule():
    assert ift.lambda_schedule(0) == 0.2 and ift.lambda_schedule(123, lam=0.5) == 0.5
    w = dict(lam=0.2, warmup_steps=10, min_lambda=0.0, max_lambda=0.4)
    assert [ift.lambda_schedule(s, **w) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    noisy = [ift.lambda_schedule(s, lam=0.2, noise_std=0.5, seed=7) for s in range(3000)]
    assert noisy[:20] == [ift.lambda_schedule(s, lam=0.2, noise_std=0.5, seed=7) for s in range(20)]
    assert noisy[:20] != [ift.lambda_schedule(s, lam=0.2, noise_std=0.5, seed=8) for s in range(20)]
    eps = (np.array(noisy) / 0.2 - 1) / 0.5        # λ = λ0 (1 + ε·std), ε ~ N(0, 1)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1 and len(set(noisy)) > 2900
    wild = [ift.lambda_schedule(s, lam=0.5, noise_std=5.0) for s in range(200)]
    assert min(wild) == 0.0 and max(wild) == 1.0


# ----------------------------------------------------------------------------- pairwise baselines

T64 = lambda *xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
sp = lambda x: math.log1p(math.exp(x))                   # noqa: E731  softplus: -log sigmoid(-x)


def test_dpo_at_reference_is_ln2():
    pc, pr = T64(-10.0, -3.0, -50.0), T64(-12.0, -4.0, -20.0)
    for eps in (0.0, 0.2):
        loss, met = ift.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=eps)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
        assert met["rewards/chosen"] == 0 and met["rewards/rejected"] == 0 and met["rewards/margin"] == 0


def test_dpo_ipo_hand_values():
    pc, pr, rc, rr = T64(-10.0), T64(-12.0), T64(-11.0), T64(-11.5)    # h = 2 - 0.5 = 1.5
    loss, met = ift.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(sp(-0.15), abs=1e-12)
    assert met["rewards/chosen"].item() == pytest.approx(0.1) and met["rewards/rejected"].item() == pytest.approx(-0.05)
    assert met["rewards/accuracy"] == 1 and met["rewards/margin"].item() == pytest.approx(0.15)
    loss, _ = ift.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * sp(-0.15) + 0.2 * sp(0.15), abs=1e-12)
    loss, met = ift.dpo_loss(pc, pr, None, None, beta=0.1, reference_free=True)
    assert loss.item() == pytest.approx(sp(-0.2), abs=1e-12) and met["rewards/chosen"].item() == pytest.approx(-1.0)
    assert ift.ipo_loss(pc, pr, rc, rr, beta=0.1)[0].item() == pytest.approx((1.5 - 5) ** 2)
    # length-normalised: chosen 4 tokens, rejected 5: h = (-2.5 + 2.4) - (-2.75 + 2.3) = 0.35
    loss, _ = ift.ipo_loss(pc, pr, rc, rr, beta=0.1, length_normalized=True, n_chosen=T64(4), n_rejected=T64(5))
    assert loss.item() == pytest.approx((0.35 - 5) ** 2)
    with pytest.raises(ValueError, match="n_chosen"):
        ift.ipo_loss(pc, pr, rc, rr, length_normalized=True)


def test_orpo_hand_value_and_near_zero_stability():
    pc, pr = T64(-0.5, -2.0), T64(-1.2, -1.0)
    lo = [(a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b))) for a, b in ((-0.5, -1.2), (-2.0, -1.0))]
    exp = np.mean([-a + 0.25 * sp(-x) for a, x in zip((-0.5, -2.0), lo)])
    loss, met = ift.orpo_loss(pc, pr, beta=0.25)
    assert loss.item() == pytest.approx(exp, abs=1e-12) and met["log_odds"].item() == pytest.approx(np.mean(lo))
    assert met["sft_loss"].item() == pytest.approx(1.25)
    x = torch.tensor([-1e-9, 0.0, -1e-30], dtype=torch.float32)
    assert not torch.isfinite(torch.log(1 - torch.exp(x))).any()          # the naive formula fails here
    pc = x.clone().requires_grad_()
    loss, _ = ift.orpo_loss(pc, torch.full((3,), -2.0), beta=0.25)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all()
    assert ift.log1mexp(x[:1]).item() == pytest.approx(math.log(1e-9), rel=1e-6)
    xs = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -1.0, -5.0, -40.0], dtype=torch.float32)
    ref = [math.log(-math.expm1(v)) for v in xs.double().tolist()]
    assert ift.log1mexp(xs).tolist() == pytest.approx(ref, rel=1e-6, abs=1e-12)


def test_simpo_hand_value():
    loss, met = ift.simpo_loss(T64(-0.5), T64(-1.0), beta=2.0, gamma_ratio=0.8)
    assert loss.item() == pytest.approx(sp(-(2.0 * 0.5 - 1.6)), abs=1e-12)
    assert met["rewards/margin"].item() == pytest.approx(1.0)


def test_kto_hand_value_and_micro_batch_one():
    pol, ref = T64(-5, -7, -6, -8), T64(-5.5, -6.5, -6, -7)
    des = torch.tensor([True, True, False, False])
    z = 0.3   # mean(0.4, 0.2)
    r = [0.5, -0.5, 0.0, -1.0]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    exp = np.mean([1 - sig(0.1 * (r[0] - z)), 1 - sig(0.1 * (r[1] - z)), 1 - sig(0.1 * (z - r[2])),
                   1 - sig(0.1 * (z - r[3]))])
    loss, met = ift.kto_loss(pol, ref, des, T64(-9, -10), T64(-9.4, -10.2), beta=0.1)
    assert loss.item() == pytest.approx(exp, abs=1e-12) and met["kl"].item() == pytest.approx(z)
    assert met["rewards/chosen"].item() == pytest.approx(0.0) and met["rewards/rejected"].item() == pytest.approx(-0.05)
    loss0, met0 = ift.kto_loss(pol, ref, des, T64(-9, -10), T64(-8, -9), beta=0.1)   # negative KL -> z = 0
    assert met0["kl"] == 0
    with pytest.raises(ValueError, match="at least 2"):
        ift.kto_loss(pol[:2], ref[:2], des[:2], T64(-9), T64(-9.4))
    rows = ift.kto_kl_rows([[1, 2], [3]], [[7], [8, 9]])
    assert rows == [{"input_ids": [1, 2, 8, 9], "labels": [-100, -100, 8, 9]},
                    {"input_ids": [3, 7], "labels": [-100, 7]}]
    with pytest.raises(ValueError, match="at least 2"):
        ift.kto_kl_rows([[1]], [[2]])
