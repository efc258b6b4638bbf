"""
On-policy mode of train.py (Tajwar et al. 2024; docs/METHOD.md §3): every k optimizer steps, sample
N responses per prompt from the *current* policy, score them with a reward function, and turn them
into the batch the objective needs:
  sft / ift      best-of-N: the highest-reward sample is the target (no negative gradient)
  dpo/ipo/orpo/simpo   pairs (best vs worst, or all) whose reward gap >= threshold, higher = chosen
  rwr            NLL weighted by min(exp(r / T), cap)
  reinforce      -(r - b) * log pi(y), b = running mean of rewards (a negative gradient)
  ppo / grpo     clipped surrogate on the ratio to the sampling policy (its log-probs recorded once per round,
                 no grad), advantages from running-normalised (PPO) or per-prompt group-normalised (GRPO)
                 rewards, optional KL to the reference; no value head (ift.clipped_pg_loss)
Sampling is seeded per (seed, round, prompt, sample), never per rank or batch, so a DDP or FSDP2 run draws
exactly the samples a single process with the same global batch draws.
"""
import hashlib
import importlib
import inspect
import math
import random
import time
from contextlib import nullcontext

import torch

import data
import ift
import tasks
from generate import generate
from infra import parallel

PG_LOSSES = ("ppo", "grpo")


# ---------------------------------------------------------------------------- rewards
def demo_reward(prompt: str, response: str) -> float:
    """The synthetic task's checker with partial credit (data.check_answer)."""
    return data.check_answer(prompt, response, partial=True)


def length_reward(prompt: str, response: str) -> float:
    """Shorter is better (the on-policy paper's min-length-style problem); 0 for an empty answer."""
    return -len(response) / 100.0


def gsm8k_reward(prompt: str, response: str, row: dict) -> float:
    """1 if the response's final number equals the gold answer's ("#### N" of a GSM8K row), else 0: the
    extraction eval_gen scores GSM8K with (the first "#### N", else the last number)."""
    gold = tasks.parse_gsm8k(row, "the data row")["gold"]
    strict, flexible = tasks.gsm8k_extract(tasks.truncate_at_stops(response, tasks.GSM8K_STOPS))
    return float(tasks.normalize_number(strict if strict is not None else flexible) == gold)


def arc_reward(prompt: str, response: str, row: dict) -> float:
    """1 if the letter the response chooses (eval_gen's lenient ARC extraction) is the row's answerKey."""
    q = tasks.parse_arc(row, "the data row")
    return float(tasks.arc_lenient(response, len(q["choices"])) == tasks.LETTERS[q["gold"]])


REWARDS = {"demo": demo_reward, "length": length_reward, "gsm8k": gsm8k_reward, "arc": arc_reward}


def load_reward(spec: str):
    """'demo', 'length', 'gsm8k', 'arc', or 'module:function': a callable (prompt_text, response_text) ->
    float, or (prompt_text, response_text, row) -> float where row is the training file's row (a dict)."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"--reward={spec!r}: expected one of {', '.join(REWARDS)} or 'module:function'")
    mod, fn = spec.split(":", 1)
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward={spec!r}: cannot load it ({e})") from None
    if not callable(f):
        raise ValueError(f"--reward={spec!r} is not callable")
    return f


def takes_row(fn) -> bool:
    """Does a reward function take the data row as a third argument?"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):   # a builtin without a signature: the two-argument form
        return False
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(pos) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def source_rows(cfg, n_examples):
    """The training rows as read from --data (or the demo's), one per example, for rewards that read the
    row (the gold answer). Rows the loader dropped (no answer token left) would shift every row after them:
    refused."""
    if cfg.data:
        rows = [r for _, r in data.read_source(cfg.data, cfg.split)[0]]
    else:
        pairwise = cfg.loss in ("dpo", "ipo", "orpo", "simpo")
        rows = (data.synthetic_pairs if pairwise else data.synthetic_task)(cfg.n_train + cfg.n_eval, cfg.seed)
        rows = rows[:cfg.n_train]
    if len(rows) != n_examples or cfg.dedup_prompts:
        raise data.DataError(f"--reward={cfg.reward} reads each example's data row, but {cfg.data or 'the demo'} gave "
                         f"{len(rows)} rows for {n_examples} examples (rows dropped by --max_length, or "
                         f"--dedup_prompts): raise --max_length or drop --dedup_prompts")
    return rows


def stable_seed(*xs) -> int:
    """A seed from values, identical in every process (Python's hash() of str is randomised)."""
    return int.from_bytes(hashlib.sha256(repr(xs).encode()).digest()[:7], "little")


def score(fn, prompt: str, response: str, row=None) -> float:
    """fn's reward as a finite float; row (the data row) is passed when given."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        r = float(fn(prompt, response) if row is None else fn(prompt, response, row))
    except Exception as e:
        raise RuntimeError(f"reward function {name} raised {type(e).__name__}: {e} "
                           f"(prompt {prompt[-60:]!r}, response {response[:60]!r})") from e
    if not math.isfinite(r):
        raise RuntimeError(f"reward function {name} returned a non-finite value {r} for response {response[:60]!r}")
    return r


# ---------------------------------------------------------------------------- batch building
def make_pairs(samples, rewards, mode="best_worst", threshold=0.2):
    """[(chosen, rejected)] from one prompt's samples; pairs closer than `threshold` are skipped."""
    order = sorted(range(len(samples)), key=lambda i: -rewards[i])
    cand = [(order[0], order[-1])] if mode == "best_worst" else \
        [(i, j) for a, i in enumerate(order) for j in order[a + 1:]]
    return [(samples[i], samples[j]) for i, j in cand if rewards[i] - rewards[j] >= threshold]


def row(prompt, answer):
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def weighted_nll_loss(model, batch):
    """RWR / REINFORCE: mean_i  w_i * (-sum_t log pi(y_i,t)), w fixed per row."""
    s, _ = ift.seq_logps(model, batch)
    w = batch["weights"].to(s.dtype)
    return (-(w * s)).mean(), {"weight_mean": w.mean().detach()}


def prompt_of(ex):
    """Prompt ids of a dataset example: before the first supervised token (first answer turn)."""
    if "prompt_ids" in ex:
        return ex["prompt_ids"]
    first = next(i for i, l in enumerate(ex["labels"]) if l != -100)
    return ex["input_ids"][:first]


class Sampler:
    def __init__(self, cfg, tok, examples, rank, world):
        if cfg.loss == "kto":
            raise ValueError("on-policy KTO is not supported (use --onpolicy_every=0)")
        self.cfg, self.tok, self.examples = cfg, tok, examples
        self.reward = load_reward(cfg.reward)
        self.rows = source_rows(cfg, len(examples)) if takes_row(self.reward) else None
        self.world = world
        self.samples = {}          # example index -> (responses, rewards) of the current round
        self.round_step = None     # step at which the current samples were drawn
        self.baseline = None       # REINFORCE running mean
        self.stats = {}
        self.advantages = {}       # PPO/GRPO: example index -> one advantage per sample
        self.old_logps = {}        # PPO/GRPO: example index -> per-sample log-probs of its response tokens
        self.running = [0.0, 0.0, 0.0]   # PPO: count, sum, sum of squares of every reward sampled so far

    def due(self, step) -> bool:
        """Sample now? Once for --sampling=offline, every onpolicy_every steps on-policy."""
        if self.round_step is None:
            return True
        return self.cfg.sampling == "onpolicy" and step % self.cfg.onpolicy_every == 0 and step != self.round_step

    @torch.no_grad()
    def refresh(self, model, step, indices, device, ctx=None):
        """Sample N responses for every prompt in `indices` from the current weights, sample_batch_size rows
        (prompt x sample) per generate call. Each row draws from its own seed (seed, step, prompt, sample),
        so what it samples does not depend on how rows are batched or sharded over ranks. Under FSDP2 the
        model is gathered once for the round (parallel.gathered): generate then makes no collective, so each
        rank makes as many calls as its own rows need, each ending when its rows stop."""
        cfg, tok = self.cfg, self.tok
        was_training = model.training
        model.eval()
        t0, ntok, allr = time.time(), 0, []
        rows = [(i, j) for i in sorted(set(indices)) for j in range(cfg.n_samples)]
        prompts = {i: prompt_of(self.examples[i]) for i, _ in rows}
        rows.sort(key=lambda r: len(prompts[r[0]]))        # little left padding per call
        got = {}
        with parallel.gathered(model):
            for a in range(0, len(rows), cfg.sample_batch_size):
                part = rows[a:a + cfg.sample_batch_size]
                with ctx or nullcontext():
                    outs = generate(model, [prompts[i] for i, _ in part], cfg.max_new_tokens,
                                          temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=[tok.eos_id],
                                          row_seeds=[stable_seed(cfg.seed, step, i, j) for i, j in part])
                got.update(zip(part, outs))
        self.samples = {}
        for i in sorted(prompts):
            outs = [got[(i, j)] for j in range(cfg.n_samples)]
            text, data_row = tok.decode(prompts[i]), self.rows[i] if self.rows is not None else None
            rs = [score(self.reward, text, tok.decode(o), data_row) for o in outs]
            self.samples[i] = (outs, rs)
            ntok += sum(map(len, outs))
            allr += rs
        model.train(was_training)
        self.round_step = step
        # Global reward statistics (one baseline and one logged mean for all ranks: DDP == single process).
        tot = torch.tensor([sum(allr), sum(x * x for x in allr), len(allr)], dtype=torch.float64, device=device)
        tot = parallel.all_reduce(tot).tolist()
        mean = tot[0] / tot[2]
        var = tot[1] / tot[2] - mean ** 2
        self.baseline = mean if self.baseline is None else 0.9 * self.baseline + 0.1 * mean
        self.stats = {"reward_mean": mean, "reward_std": max(var, 0.0) ** 0.5,
                      "sample_tok_s": ntok * self.world / max(time.time() - t0, 1e-9)}
        if cfg.loss in PG_LOSSES:
            self.set_advantages(tot)

    def set_advantages(self, tot):
        """PPO: (r - mean) / std over every reward sampled so far; GRPO: normalised inside each prompt's
        group of n_samples (--scale_rewards; "batch" takes the std of this round's rewards on all ranks).
        tot = this round's global (sum, sum of squares, count) of rewards."""
        if self.cfg.loss == "ppo":
            self.running = [self.running[0] + tot[2], self.running[1] + tot[0], self.running[2] + tot[1]]
            n, s1, s2 = self.running
            mean = s1 / n
            std = max(s2 / n - mean * mean, 0.0) ** 0.5
            self.advantages = {i: ift.running_advantages(rs, mean, std).tolist()
                               for i, (_, rs) in self.samples.items()}
            return
        n = tot[2]
        batch_std = max((tot[1] - tot[0] ** 2 / n) / (n - 1), 0.0) ** 0.5 if n > 1 else 0.0
        self.advantages = {i: ift.group_advantages(torch.tensor([rs], dtype=torch.float64), self.cfg.scale_rewards,
                                                   batch_std=batch_std)[0].tolist()
                           for i, (_, rs) in self.samples.items()}

    def pg_rows(self, idx):
        """PPO/GRPO rows (prompt + sample, the sample supervised) of the examples idx, every sample in order."""
        return [row(prompt_of(self.examples[i]), o) for i in idx for o in self.samples[i][0]]

    @torch.no_grad()
    def record_old_logps(self, model, micro_batches, device, ctx=None):
        """PPO/GRPO: the log-probs of this round's samples under the weights that drew them, computed once,
        now, in the very micro-batches (padding, shapes) and compute context training will use, so the ratio
        of the first step after sampling is exactly 1. Every rank runs as many forwards (FSDP2)."""
        was_training = model.training
        model.eval()
        self.old_logps = {}
        for idx in micro_batches:
            b = data.to_device(data.collate(self.pg_rows(idx), self.tok.pad_id), device)
            with ctx or nullcontext():
                lp, m = ift.token_logps(model, b)
            per_row = iter(lp[m].cpu().split(m.sum(1).tolist()))     # one copy to the host per micro-batch
            for i in idx:
                self.old_logps.setdefault(i, [next(per_row) for _ in self.samples[i][0]])
        model.train(was_training)

    def state_dict(self):
        """This rank's round (samples, rewards, baseline), as plain tensors for the checkpoint: a resumed
        run trains on the very samples the interrupted one drew (offline: those of the initial policy)."""
        idx = sorted(self.samples)
        outs = [o for i in idx for o in self.samples[i][0]]
        sd = {"round_step": -1 if self.round_step is None else self.round_step,
              "baseline": float("nan") if self.baseline is None else self.baseline,
              "stats": dict(self.stats), "idx": torch.tensor(idx, dtype=torch.long),
              "lengths": torch.tensor([len(o) for o in outs], dtype=torch.long),
              "tokens": torch.tensor([t for o in outs for t in o], dtype=torch.long),
              "rewards": torch.tensor([r for i in idx for r in self.samples[i][1]], dtype=torch.float64)}
        if self.cfg.loss in PG_LOSSES:   # the round's advantages and recorded log-probs (token-aligned)
            sd["advantages"] = torch.tensor([a for i in idx for a in self.advantages[i]], dtype=torch.float64)
            sd["old_logps"] = torch.cat([x for i in idx for x in self.old_logps[i]]) if idx else torch.zeros(0)
            sd["running"] = torch.tensor(self.running, dtype=torch.float64)
        return sd

    def load_state_dict(self, sd):
        n = self.cfg.n_samples
        lengths, tokens, rewards = sd["lengths"].tolist(), sd["tokens"].tolist(), sd["rewards"].tolist()
        offs = [0]
        for x in lengths:
            offs.append(offs[-1] + x)
        outs = [tokens[offs[k]:offs[k + 1]] for k in range(len(lengths))]
        self.samples = {i: (outs[a * n:(a + 1) * n], rewards[a * n:(a + 1) * n]) for a, i in enumerate(sd["idx"].tolist())}
        self.round_step = None if sd["round_step"] < 0 else int(sd["round_step"])
        self.baseline = None if math.isnan(sd["baseline"]) else float(sd["baseline"])
        self.stats = dict(sd["stats"])
        if "advantages" in sd:
            idx, adv, lps = sd["idx"].tolist(), sd["advantages"].tolist(), sd["old_logps"].split(lengths)
            self.advantages = {i: adv[a * n:(a + 1) * n] for a, i in enumerate(idx)}
            self.old_logps = {i: list(lps[a * n:(a + 1) * n]) for a, i in enumerate(idx)}
            self.running = sd["running"].tolist()

    def batch(self, idx, ref_model, device, ctx=None):
        """The micro-batch for the objective from this round's samples (+ dataset rows by replay)."""
        cfg, pad = self.cfg, self.tok.pad_id
        rng = random.Random(stable_seed(cfg.seed, "replay", idx))
        if cfg.loss in ("sft", "ift"):
            rows = []
            for i in idx:
                outs, rs = self.samples[i]
                ex = self.examples[i]
                use_data = rng.random() < cfg.replay_ratio and "input_ids" in ex
                rows.append(ex if use_data else row(prompt_of(ex), outs[max(range(len(rs)), key=rs.__getitem__)]))
            return data.to_device(data.collate(rows, pad), device), None
        if cfg.loss in PG_LOSSES:
            b = data.to_device(data.collate(self.pg_rows(idx), pad), device)
            m = b["labels"][:, 1:] != -100
            b["old_logps"] = ift._scatter(torch.cat([x for i in idx for x in self.old_logps[i]]).to(device), m)
            b["advantages"] = torch.tensor([a for i in idx for a in self.advantages[i]], dtype=torch.float64,
                                           device=device)
            ref = None
            if ref_model is not None:   # per-token reference log-probs for the KL term, in the policy's context
                with torch.no_grad(), ctx or nullcontext():
                    ref = ift.token_logps(ref_model, b)[0]
            return b, ref
        if cfg.loss in ("rwr", "reinforce"):
            rows, w = [], []
            for i in idx:
                outs, rs = self.samples[i]
                for o, r in zip(outs, rs):
                    rows.append(row(prompt_of(self.examples[i]), o))
                    w.append(min(math.exp(r / cfg.rwr_temperature), cfg.rwr_cap) if cfg.loss == "rwr"
                             else r - self.baseline)
            b = data.collate(rows, pad)
            b["weights"] = torch.tensor(w)
            return data.to_device(b, device), None
        pairs = []
        for i in idx:
            outs, rs = self.samples[i]
            p = prompt_of(self.examples[i])
            pairs += [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                      for c, r in make_pairs(outs, rs, cfg.pairs, cfg.pair_threshold)]
        self.stats["pairs"] = len(pairs)
        empty = not pairs
        if empty:   # no usable pair: a zero-weighted dummy pair keeps every rank's backward in step
            p = prompt_of(self.examples[idx[0]])
            pairs = [{"prompt_ids": p, "chosen_ids": [self.tok.eos_id], "rejected_ids": [self.tok.eos_id]}]
        b = data.to_device(data.collate_pairs(pairs, pad), device)
        b["loss_scale"] = torch.tensor(0.0 if empty else 1.0, device=device)
        ref = None
        if ref_model is not None:   # in the policy's compute context, so margins start at 0 exactly
            with torch.no_grad(), ctx or nullcontext():
                ref = ift.seq_logps(ref_model, b)[0]
        return b, ref


def pg_loss(cfg, model, batch, ref_logps):
    """PPO/GRPO on a Sampler.batch micro-batch: ift.clipped_pg_loss with the run's settings."""
    lp, m = ift.token_logps(model, batch)
    return ift.clipped_pg_loss(lp, batch["old_logps"], m, batch["advantages"], ref_logps, clip_low=cfg.clip_low,
                               clip_high=cfg.clip_high, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                               average=cfg.pg_average, max_len=cfg.max_new_tokens)
