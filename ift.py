"""Intuitive Fine-Tuning (Hua et al., ACL 2025) and the baseline objectives, as small pure functions.

Conventions (METHOD §1.1): batch = {"input_ids" [B,T], "labels" [B,T] (-100 = not supervised), optional
"attention_mask"}. Shifted position t scores labels[:, t+1] from the logits at t, so every per-token tensor
is [B, T-1] with mask m = labels[:, 1:] != -100. Log-probs are fp32 (fp64 for an fp64 model): the model
returns logits only at the rows that score a supervised label (`select`), and the fp32 log-softmax runs over
those rows in chunks, so neither a (B,T,V) nor an fp32 (N,V) logits tensor exists for the whole batch.
Batch reduction everywhere: per-sequence mean over answer tokens, then the mean over the sequences that have
at least one answer token. A row with no supervised token adds no loss and is not counted (no NaN).
"""
import math
import random

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- log-probs


def _neg_ce(x, y):
    return -F.cross_entropy(x.to(torch.promote_types(x.dtype, torch.float32)), y, reduction="none")


def label_logps(logits, targets, chunk: int = 4096):
    """log softmax(logits)[targets] in fp32 (fp64 for fp64 logits), `chunk` rows at a time: [N,V] -> [N].
    Low-precision logits that need grad go through a checkpoint: backward then keeps the bf16 chunk (which
    the caller's logits already hold) instead of a saved fp32 log-softmax of twice the size."""
    out = []
    for i in range(0, max(len(targets), 1), chunk):  # max(.., 1): an empty batch still returns a graph
        x, y = logits[i:i + chunk], targets[i:i + chunk]
        low = x.requires_grad and x.dtype in (torch.float16, torch.bfloat16)
        out.append(checkpoint(_neg_ce, x, y, use_reentrant=False) if low else _neg_ce(x, y))
    return torch.cat(out)


def greedy_and_label_logps(logits, targets, elems: int = 1 << 22):
    """No grad: (argmax [N], log softmax(logits)[targets] [N] in fp32) of [N,V] logits, both from one
    chunk of rows at a time (about `elems` logits, 16 MiB in fp32), so neither an fp32 [N,V] log-softmax
    nor a bf16 -> fp32 copy of all logits is ever allocated (on CPU, 768 x 32000 logits: 43 ms against
    81 ms for a max over all rows and then label_logps' 4096-row chunks). Row by row the same values as
    logits.max(-1).indices and label_logps, bit for bit."""
    rows = max(1, elems // max(logits.shape[-1], 1))
    guess, lp = [], []
    for i in range(0, max(len(targets), 1), rows):
        x = logits[i:i + rows]
        guess.append(x.max(-1).indices)      # max: faster than argmax on CPU
        lp.append(_neg_ce(x, targets[i:i + rows]))
    return torch.cat(guess), torch.cat(lp)


def _select(m):
    """[B,T-1] label mask -> [B,T] positions whose logits score a supervised next token."""
    return torch.cat([m, m.new_zeros(m.shape[0], 1)], 1)


def _scatter(vals, m):
    """Selected values (row-major, as mask.nonzero()) back into a zero [B,T-1] tensor."""
    return torch.zeros(m.shape, dtype=vals.dtype, device=m.device).masked_scatter(m, vals)


def token_logps(model, batch, chunk: int = 4096, **fwd):
    """(lp [B,T-1] >= fp32, m [B,T-1] bool): lp[b,t] = log p(labels[b,t+1] | ids[b,:t+1]), 0 where m is 0.
    fwd goes to the model (mix_ids, mix_lambda, freeze_embeddings)."""
    ids, labels = batch["input_ids"], batch["labels"]
    m = labels[:, 1:] != -100
    logits = model(ids, attention_mask=batch.get("attention_mask"), select=_select(m), **fwd)
    return _scatter(label_logps(logits, labels[:, 1:][m], chunk), m), m


def seq_logps(model, batch, **fwd):
    """(summed [B], mean [B]) log-probs of the supervised tokens of each row (fp32; mean = 0 for empty rows)."""
    lp, m = token_logps(model, batch, **fwd)
    s = lp.sum(-1)
    return s, s / m.sum(-1).clamp(min=1)


def _row_mean(x, m):
    """The batch reduction of the module docstring, for x [B,T-1] already 0 where m is 0."""
    n = m.sum(-1)
    return (x.sum(-1) / n.clamp(min=1)).sum() / (n > 0).sum().clamp(min=1)


def sft_loss(model, batch, token_mean: bool = False):
    """SFT: per-sequence mean NLL then batch mean (authors' convention); token_mean: sum NLL / #answer
    tokens of this micro-batch (a per-micro-batch normaliser; not a global token mean under accumulation)."""
    lp, m = token_logps(model, batch)
    seq = _row_mean(-lp, m)
    loss = -lp.sum() / m.sum().clamp(min=1) if token_mean else seq
    return loss, {"sft_loss": seq.detach()}


def dft_loss(model, batch, token_mean: bool = False):
    """DFT (dynamic fine-tuning, Wu et al. 2025; TRL's loss_type="dft"): each token's NLL scaled by its own
    detached probability, -sum_t sg(p_t) log p_t, so confident tokens weigh more and near-impossible ones
    ~0 (the gradient is p_t * d(-log p_t), i.e. d(-p_t) with the weight frozen). Reduced as sft_loss (per
    sequence mean, then batch mean; token_mean as there). Metrics: sft_loss, the plain NLL of the batch."""
    lp, m = token_logps(model, batch)
    x = -lp * lp.detach().exp()   # lp is 0 at masked slots, so x is too
    loss = x.sum() / m.sum().clamp(min=1) if token_mean else _row_mean(x, m)
    return loss, {"sft_loss": _row_mean(-lp.detach(), m)}

# ----------------------------------------------------------------------------- relation propagation


def discounted_cumsum(x, gamma: float, reverse: bool = False, block: int = 64):
    """Along the last dim: y_t = sum_{j<=t} gamma^(t-j) x_j, or with reverse sum_{j>=t} gamma^(j-t) x_j.
    Blocked: inside a block of K positions a KxK triangle of gamma^(t-j), t >= j; block ends are chained by
    an (nb x nb) triangle of gamma^(K*d). Exponents are never negative, so nothing overflows for gamma in
    [0, 1] (0**0 = 1) and any T; terms that underflow are below fp32 resolution anyway. Broadcast-multiply
    and sum rather than matmul: autocast would run a matmul in bf16 and TF32 would round it."""
    if reverse:
        return discounted_cumsum(x.flip(-1), gamma, False, block).flip(-1)
    T = x.shape[-1]
    K = max(1, min(block, T))
    nb = -(-T // K)
    xb = F.pad(x, (0, nb * K - T)).unflatten(-1, (nb, K))                 # [..., nb, K]
    k = torch.arange(K, device=x.device, dtype=x.dtype)
    d = k[:, None] - k[None, :]                                           # t - j
    M = torch.where(d >= 0, gamma ** d.clamp(min=0), 0.0)
    local = (xb[..., None, :] * M).sum(-1)                                # sums inside each block
    b = torch.arange(nb, device=x.device, dtype=x.dtype)
    db = b[:, None] - b[None, :]
    Mb = torch.where(db >= 0, (gamma ** K) ** db.clamp(min=0), 0.0)
    ends = (local[..., None, :, -1] * Mb).sum(-1)                         # y at the last slot of each block
    prev = F.pad(ends[..., :-1], (1, 0))                                  # carried into the next block
    y = local + prev[..., None] * gamma ** (k + 1)
    return y.flatten(-2)[..., :T]


def propagation_weights(logps, mask, gamma: float = 0.95, kind: str = "loss", side: str = "left",
                        norm: str = "L1"):
    """METHOD §1.2 weights [B,T-1] (rows sum to n_b), differentiable in logps (attached, as the authors').
    mask may be bool or float. No in-place writes on autograd-saved tensors (the authors' softmax crash)."""
    if kind not in ("loss", "logps", "mask") or side not in ("left", "right") \
            or norm not in ("L1", "L2", "softmax", "log"):
        raise ValueError(f"propagation_weights: unknown kind/side/norm {kind!r}/{side!r}/{norm!r}")
    mb = mask != 0
    m = mb.to(logps.dtype)
    if gamma == 0:
        return m
    n = m.sum(-1, keepdim=True)
    # Per-token item; torch.where so masked logps (any value) never enter the sums or their gradient.
    c = m if kind == "mask" else torch.where(mb, -logps, 0.0)
    if kind == "loss":
        c = c / n.clamp(min=1)
    if side == "left":   # discounted loss-to-go: early tokens carry the loss of what follows them
        S = torch.where(mb, discounted_cumsum(c, gamma, reverse=True), 0.0)
        w = {"L1": S, "L2": S ** 2, "softmax": torch.softmax(S, -1), "log": torch.log1p(S)}[norm]
    else:                # discounted loss-so-far, inverted: tokens after an easy prefix weigh more
        P = torch.where(mb, discounted_cumsum(c, gamma), 1e6)   # sentinel keeps masked slots out of the min
        # Authors' shift by the smallest nonzero value of the WHOLE micro-batch (attached): rows couple.
        P = P + P.masked_fill(P == 0, math.inf).amin()
        w = {"L1": 1 / P, "L2": P ** -2, "softmax": torch.softmax(1 / P, -1), "log": 1 / torch.log1p(P)}[norm]
    w = torch.where(mb, w, 0.0)
    den = w.sum(-1, keepdim=True)
    return w * n / torch.where(den > 0, den, 1.0)   # den = 0 only for empty or all-zero-loss rows


def ift_objective(lp, m, gamma: float = 0.95, kind: str = "loss", side: str = "left", norm: str = "L1",
                  detach_weights: bool = False):
    """METHOD §1.1 steps 6-7 on second-pass log-probs: (loss, weights)."""
    w = propagation_weights(lp, m, gamma, kind, side, norm)
    if detach_weights:
        w = w.detach()
    return _row_mean(-lp * w, m), w


def ift_loss(model, batch, lam: float = 0.2, gamma: float = 0.95, kind: str = "loss", side: str = "left",
             norm: str = "L1", detach_weights: bool = False, freeze_input_embeddings: bool = False,
             chunk: int = 4096):
    """One IFT step (METHOD §1.1). With m = labels[:,1:] != -100 and n_b = sum_t m[b,t]:
      1. no grad: g[:, t] = argmax p(. | ids[:, :t]) (greedy guess of token t itself), g[:, 0] = ids[:, 0]
      2. x_hat = where(labels == -100, ids, g)                           (prompt/pad positions untouched)
      3. e = (1 - lam) E(ids) + lam E(x_hat)                             (temporal residual connection)
      4. lp[b,t] = log p(labels[b,t+1] | e[b, :t+1])                     (ground-truth targets, with grad)
      5. loss = mean_b sum_t -lp[b,t] w[b,t] / n_b,  w = propagation_weights(lp, m, gamma, kind, side, norm)
    lam = 0 skips pass 1; lam = 0 and gamma = 0 is SFT exactly. Pass 1 computes logits only at rows whose
    next label is supervised and keeps no activations; the mix happens inside model.forward (FSDP2-safe).
    Versus the authors' code (METHOD §1.5), what we chose:
    - w depends on lp and their code backpropagates through it (the loss is a ratio of losses, not an NLL
      with constant token weights). Default: same; detach_weights=True gives the constant-weight reading.
    - their mix reads a frozen copy of the input embedding table, so input embeddings never train:
      freeze_input_embeddings=True reproduces that; the default trains them.
    - right-side weights are shifted by a micro-batch-wide minimum (rows couple), kept and documented;
      left side (the default) never couples rows. Their softmax/mask options crash; ours work.
    - empty rows give NaN there; here they add no loss and are not counted. (bf16 parameters and the
      multi-GPU all-reduce are train.py's business: fp32 master weights, standard DDP/FSDP2 reduction.)
    Metrics: sft_loss (pass-1 NLL under true prefixes, comparable to an SFT run), nll_mixed (unweighted
    pass-2 NLL), lam, guess_mismatch (fraction of supervised tokens whose greedy guess is wrong)."""
    ids, labels = batch["input_ids"], batch["labels"]
    m = labels[:, 1:] != -100
    metrics, mix = {"lam": float(lam)}, None
    if lam != 0:
        with torch.no_grad():
            logits0 = model(ids, attention_mask=batch.get("attention_mask"), select=_select(m))
            tgt = labels[:, 1:][m]
            guess, lp0 = greedy_and_label_logps(logits0, tgt)
            metrics["sft_loss"] = _row_mean(-_scatter(lp0, m), m)
            metrics["guess_mismatch"] = (guess != tgt).float().mean() if tgt.numel() else torch.zeros(())
            del logits0
        mix = ids.clone()
        mix[:, 1:][m] = guess   # the guess made at t is the guess of token t+1
    lp, m = token_logps(model, batch, chunk, mix_ids=mix, mix_lambda=float(lam),
                        freeze_embeddings=freeze_input_embeddings)
    loss, _ = ift_objective(lp, m, gamma, kind, side, norm, detach_weights)
    metrics["nll_mixed"] = _row_mean(-lp.detach(), m)
    metrics.setdefault("sft_loss", metrics["nll_mixed"])   # lam = 0: pass 2 is the plain pass
    return loss, metrics


def lambda_schedule(step: int, *, lam: float = 0.2, warmup_steps: int = 0, min_lambda=None, max_lambda=None,
                    noise_std: float = 0.0, seed: int = 0) -> float:
    """λ for optimizer step `step` (METHOD §1.4). Without warm-up: lam (min/max ignored). With warm-up: linear
    from min_lambda (default 0) to max_lambda (default lam) over warmup_steps, then max_lambda. Noise:
    λ += ε·noise_std·λ, one ε ~ N(0,1) per (seed, step) from its own generator, so every micro-batch and
    rank of a step agree without communicating. Clamped to [0, 1]."""
    if warmup_steps > 0:
        hi = lam if max_lambda is None else max_lambda
        lo = 0.0 if min_lambda is None else min_lambda
        x = lo + (hi - lo) * min(step / warmup_steps, 1.0)
    else:
        x = lam
    if noise_std:
        # A string seed is hashed with SHA-512 (stable across runs and Python versions); torch's CPU
        # generator would keep only 32 bits of a combined (seed, step) integer.
        x += random.Random(f"ift-lambda:{int(seed)}:{int(step)}").gauss(0.0, 1.0) * noise_std * x
    return min(max(float(x), 0.0), 1.0)

# ----------------------------------------------------------------------------- pairwise baselines (METHOD §2)
# Inputs are fp32 sequence log-probs [B] (seq_logps); each returns (loss, metrics). Rewards are detached.


def _pair_metrics(rc, rr):
    rc, rr = rc.detach(), rr.detach()
    return {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
            "rewards/accuracy": (rc > rr).float().mean(), "rewards/margin": (rc - rr).mean()}


def dpo_loss(pc, pr, rc, rr, beta: float = 0.1, label_smoothing: float = 0.0, reference_free: bool = False):
    """DPO on summed log-probs; label_smoothing = cDPO's ε; reference_free: reference log-probs taken as 0
    (also in the logged rewards; rc/rr may then be None)."""
    if reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    h = (pc - pr) - (rc - rr)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss.mean(), _pair_metrics(beta * (pc - rc), beta * (pr - rr))


def ipo_loss(pc, pr, rc, rr, beta: float = 0.1, length_normalized: bool = False, n_chosen=None, n_rejected=None):
    """IPO (h - 1/(2β))². Default: summed log-ratios, as the DPO repo that the authors' code (and their IPO
    baseline) builds on. length_normalized=True divides each log-prob by its answer length n_chosen /
    n_rejected first (current TRL). Passing per-token means with the default is the same thing."""
    if length_normalized:
        if n_chosen is None or n_rejected is None:
            raise ValueError("ipo_loss(length_normalized=True) needs n_chosen and n_rejected (answer lengths)")
        pc, rc, pr, rr = pc / n_chosen, rc / n_chosen, pr / n_rejected, rr / n_rejected
    h = (pc - pr) - (rc - rr)
    return ((h - 1 / (2 * beta)) ** 2).mean(), _pair_metrics(beta * (pc - rc), beta * (pr - rr))


def log1mexp(x):
    """log(1 - e^x) for x <= 0 without cancellation (Mächler 2012). Each branch sees only inputs where it
    is finite: torch.where still backpropagates 0 * (the other branch's inf) = NaN otherwise."""
    near = x > -math.log(2)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def orpo_loss(pc_mean, pr_mean, beta: float = 0.25):
    """ORPO on average log-probs: -pc - β logσ(log odds(c) - log odds(r)). An average log-prob of exactly 0
    (every token saturated in fp32) would give log(0): clamped to -1e-12, no effect otherwise."""
    pc, pr = pc_mean.clamp(max=-1e-12), pr_mean.clamp(max=-1e-12)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    loss = (-pc_mean - beta * F.logsigmoid(log_odds)).mean()
    return loss, {"sft_loss": -pc_mean.detach().mean(), "log_odds": log_odds.detach().mean(),
                  **_pair_metrics(beta * pc_mean, beta * pr_mean)}


def simpo_loss(pc_mean, pr_mean, beta: float = 2.0, gamma_ratio: float = 0.8):
    """SimPO: -logσ(β(pc - pr) - γ), γ = gamma_ratio·β, on average log-probs (no reference)."""
    loss = -F.logsigmoid(beta * (pc_mean - pr_mean) - gamma_ratio * beta).mean()
    return loss, _pair_metrics(beta * pc_mean, beta * pr_mean)


def kto_kl_rows(prompts, answers):
    """KTO's mismatched rows: prompt_i + answer_{i+1 mod n}, as {"input_ids", "labels"} examples."""
    n = len(prompts)
    if n < 2:
        raise ValueError("KTO needs a micro-batch of at least 2: with 1, the KL row pairs a prompt with its own answer")
    rot = [answers[(i + 1) % n] for i in range(n)]
    return [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, rot)]


def kto_loss(policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO with r = π - ref (summed), z = max(0, mean(kl_π - kl_ref)) detached from the mismatched rows
    (kto_kl_rows). z is this micro-batch's estimate (TRL all-gathers it across ranks; we do not)."""
    if kl_policy_logps.numel() < 2:
        raise ValueError("kto_loss: the KL estimate needs a micro-batch of at least 2 examples; with 1 the "
                         "'mismatched' row pairs a prompt with its own answer. Use micro_batch_size >= 2.")
    z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    r = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    d, u, rd = desirable.float(), (~desirable).float(), beta * r.detach()
    return losses.mean(), {"kl": z, "rewards/chosen": (rd * d).sum() / d.sum().clamp(min=1),
                           "rewards/rejected": (rd * u).sum() / u.sum().clamp(min=1)}

# ----------------------------------------------------------------------------- clipped policy gradient (METHOD §3.5)
# PPO without a value head and GRPO: per-token log-probs [B, T-1] of the policy being trained (lp), of the
# policy that drew the samples (old_lp, recorded at sampling, no grad) and of the reference (ref_lp); one
# advantage per sample, broadcast over its response tokens (mask m).

PG_AVERAGES = ("sequence", "token", "constant")
KL_ESTIMATORS = ("k3", "logratio")
REWARD_SCALES = ("group", "batch", "none")


def group_advantages(rewards, scale: str = "group", eps: float = 1e-4, batch_std=None):
    """GRPO advantages of rewards [P, N] (N samples of each of P prompts): r - the group's mean, divided by
    (std + eps) where std is the group's (scale="group"), the whole round's (scale="batch"; batch_std, else
    that of `rewards`) or none at all (scale="none", Dr. GRPO). Std with Bessel's correction. A group whose
    rewards are all equal gets 0 (no NaN, also for N = 1)."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"group_advantages: scale {scale!r} is not one of {', '.join(REWARD_SCALES)}")
    r = rewards.double()
    adv = r - r.mean(1, keepdim=True)
    if scale == "none":
        return adv
    if scale == "group":
        std = r.std(1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    else:
        std = torch.as_tensor(batch_std if batch_std is not None else (r.std() if r.numel() > 1 else 0.0),
                              dtype=r.dtype)
    return adv / (std + eps)


def running_advantages(rewards, mean: float, std: float):
    """PPO advantages as the on-policy paper normalises rewards: (r - mean) / std with the running mean and
    std of every reward sampled so far; 0 while they have no spread."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    return (r - mean) / std if std > 1e-12 else torch.zeros_like(r)


def kl_penalty(lp, ref_lp, estimator: str = "k3"):
    """Per-token KL to the reference: k3 = exp(ref - lp) - (ref - lp) - 1 (>= 0; GRPO, TRL) or the plain
    log-ratio lp - ref (the on-policy paper's PPO)."""
    if estimator == "k3":
        d = ref_lp - lp
        return torch.exp(d) - d - 1
    if estimator == "logratio":
        return lp - ref_lp
    raise ValueError(f"kl_penalty: estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")


def clipped_pg_loss(lp, old_lp, m, advantages, ref_lp=None, clip_low: float = 0.2, clip_high: float = 0.2,
                    kl_coef: float = 0.0, kl_estimator: str = "k3", average: str = "sequence", max_len=None):
    """Clipped surrogate + KL, per token t of sample b (the caller's mask m):
      ratio = exp(lp - old_lp)                                       (exactly 1 right after sampling)
      l[b,t] = -min(ratio·A_b, clip(ratio, 1 - clip_low, 1 + clip_high)·A_b) + kl_coef·KL[b,t]
    A token whose ratio has left the clip range on the side A pushes it gets no policy gradient. average:
      "sequence"  mean over samples of each one's token mean (house convention; TRL loss_type="grpo")
      "token"     sum over the micro-batch's tokens / their number (TRL "bnpo"; = "dapo" in one micro-batch)
      "constant"  sum / (B · max_len): every token the same weight whatever the lengths (TRL "dr_grpo")
    Returns (loss, metrics): clip_frac (tokens whose clipped term was taken with a gradient lost), ratio_dev
    (max |ratio - 1|: 0.0 at the first step after sampling), kl (token mean, when kl_coef), adv_mean."""
    if average not in PG_AVERAGES:
        raise ValueError(f"clipped_pg_loss: average {average!r} is not one of {', '.join(PG_AVERAGES)}")
    mf = m.to(lp.dtype)
    ratio = torch.exp(torch.where(m, lp - old_lp, 0.0))
    A = advantages.to(lp.dtype)[:, None]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * A, clipped * A)
    metrics = {}
    if kl_coef:
        if ref_lp is None:
            raise ValueError("clipped_pg_loss: kl_coef > 0 needs the reference log-probs ref_lp")
        kl = torch.where(m, kl_penalty(lp, ref_lp, kl_estimator), 0.0)
        per_token = per_token + kl_coef * kl
        metrics["kl"] = (kl.detach() * mf).sum() / mf.sum().clamp(min=1)
    per_token = per_token * mf
    if average == "sequence":
        loss = _row_mean(per_token, m)
    elif average == "token":
        loss = per_token.sum() / mf.sum().clamp(min=1)
    else:
        if not max_len:
            raise ValueError('clipped_pg_loss: average="constant" needs max_len (the longest response allowed)')
        loss = per_token.sum() / (lp.shape[0] * max_len)
    n = mf.sum().clamp(min=1)
    with torch.no_grad():
        lost = ((ratio * A) > (clipped * A)) & m
        # masked tokens have ratio exp(0) = 1: they add 0 to the max, which needs no host-side m.any()
        metrics.update(clip_frac=lost.sum() / n, ratio_dev=((ratio - 1).abs() * mf).amax() if ratio.numel() else
                       ratio.new_zeros(()), adv_mean=A.mean())
    return loss, metrics
