"""PPO and GRPO (ift.clipped_pg_loss, onpolicy.py): the formulas against an independent transcription and
against TRL's GRPO loss, the ratio and the clip inside a reused sampling round, the GSM8K/ARC verifiers."""
import json
import math

import pytest
import torch

import data
import ift
import onpolicy
import train
from test_train import ROOT, TINY


def rand_inputs(B=5, T=7, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)   # ratios on both sides of the clip
    ref = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    m = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return lp, old, ref, m, adv


# ----------------------------------------------------------------------------- independent transcription
def by_hand(lp, old, ref, m, adv, eps_lo, eps_hi, beta, kl, average, max_len):
    """The formulas of docs/METHOD.md §3.5, token by token in Python."""
    B, T = lp.shape
    seq_losses, total, count = [], 0.0, 0
    for b in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not m[b, t]:
                continue
            rho = torch.exp(lp[b, t] - old[b, t])
            a = adv[b]
            clipped = min(max(rho, 1 - eps_lo), 1 + eps_hi)     # a constant (no gradient) outside the range
            term = -(rho * a if rho * a < clipped * a else clipped * a)
            if beta:
                if kl == "k3":
                    term = term + beta * (torch.exp(ref[b, t] - lp[b, t]) - (ref[b, t] - lp[b, t]) - 1)
                else:
                    term = term + beta * (lp[b, t] - ref[b, t])
            s, n = s + term, n + 1
        seq_losses.append(s / n)
        total, count = total + s, count + n
    if average == "sequence":
        return sum(seq_losses) / B
    if average == "token":
        return total / count
    return total / (B * max_len)


def by_hand_grad(lp, *args):
    x = lp.clone().requires_grad_(True)
    loss = by_hand(x, *args)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("average", ift.PG_AVERAGES)
@pytest.mark.parametrize("kl,beta", [("k3", 0.0), ("k3", 0.04), ("logratio", 0.1)])
@pytest.mark.parametrize("eps_lo,eps_hi", [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_pg_loss_equals_the_formula_by_hand(average, kl, beta, eps_lo, eps_hi):
    lp, old, ref, m, adv = rand_inputs(seed=1)
    want, want_grad = by_hand_grad(lp, old, ref, m, adv, eps_lo, eps_hi, beta, kl, average, 9)
    x = lp.clone().requires_grad_(True)
    got, met = ift.clipped_pg_loss(x, old, m, adv, ref, clip_low=eps_lo, clip_high=eps_hi, kl_coef=beta,
                                   kl_estimator=kl, average=average, max_len=9)
    got.backward()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (got, want)
    assert torch.allclose(x.grad, want_grad, rtol=1e-10, atol=1e-14)
    assert 0 < met["clip_frac"] < 1        # the inputs do reach the clip


# ----------------------------------------------------------------------------- TRL's GRPO, transcribed
# From huggingface/trl at commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (1.10.0.dev0):
# trl/trainer/grpo_trainer.py GRPOTrainer._generate_and_score_completions (advantages, sum_then_normalize,
# one reward function) and GRPOTrainer._compute_loss (token-level importance sampling, no delta, no entropy
# mask, no vLLM correction), trl/trainer/utils.py nanstd. A test-only oracle: TRL is not a dependency.
def trl_nanstd(tensor, dim=None, keepdim=False):
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.squeeze())


def trl_advantages(rewards, num_generations, scale_rewards):
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


def trl_compute_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask,
                     beta, epsilon_low, epsilon_high, loss_type, max_completion_length, num_items_in_batch,
                     num_processes=1, current_gradient_accumulation_steps=1):
    mask = completion_mask
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        loss = loss / current_gradient_accumulation_steps
    elif loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        loss = (per_token_loss * mask).sum() / normalizer
    return loss


TRL_TO_OURS = {"grpo": "sequence", "bnpo": "token", "dapo": "token", "dr_grpo": "constant"}


@pytest.mark.parametrize("loss_type", list(TRL_TO_OURS))
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_equals_trl(loss_type, scale_rewards, beta):
    P, N, T = 3, 4, 6
    g = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 3, (P, N), generator=g).double()
    rewards[1] = 1.0                                      # a group without spread: advantage 0, no NaN
    lp, old, ref, m, _ = rand_inputs(P * N, T, seed=3)
    lp_trl = torch.where(m, lp, torch.randn(lp.shape, generator=g, dtype=lp.dtype))   # TRL's pads hold values
    adv_trl = trl_advantages(rewards.flatten(), N, scale_rewards)
    adv = ift.group_advantages(rewards, scale_rewards).flatten()
    # TRL's Bessel factor count / (count - 1) divides int64 tensors: a float32 4/3 (relative error ~1e-8)
    assert torch.allclose(adv, adv_trl, rtol=1e-7, atol=1e-12) and torch.all(adv[N:2 * N] == 0)
    x_trl, x = lp_trl.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    want = trl_compute_loss(x_trl, old, ref, adv, m.double(), beta, 0.2, 0.28, loss_type, T,
                            num_items_in_batch=m.sum().double())
    got, _ = ift.clipped_pg_loss(x, old, m, adv, ref, clip_low=0.2, clip_high=0.28, kl_coef=beta,
                                 average=TRL_TO_OURS[loss_type], max_len=T)
    want.backward()
    got.backward()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (got, want)
    assert torch.allclose(x.grad, x_trl.grad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- ratio and clip
def test_ratio_is_one_at_sampling_and_clipped_tokens_get_no_gradient():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.9]], dtype=torch.float64))
    m = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x = old.clone().requires_grad_(True)
    loss, met = ift.clipped_pg_loss(x, old, m, adv, average="sequence")
    loss.backward()
    assert met["ratio_dev"] == 0.0 and met["clip_frac"] == 0.0
    # at ratio 1 the gradient is the policy gradient: -A / (tokens of the sample · samples) per token
    assert torch.equal(x.grad, torch.tensor([[-1 / 6] * 3, [1 / 4, 1 / 4, 0.0]], dtype=torch.float64))
    # ratios 1.5 (A > 0: clipped), 0.9 (inside), 0.5 (A > 0, below: kept); 1.5 and 0.5 with A < 0
    shift = torch.log(torch.tensor([[1.5, 0.9, 0.5], [1.5, 0.5, 1.0]], dtype=torch.float64))
    x = (old + shift).requires_grad_(True)
    loss, met = ift.clipped_pg_loss(x, old, m, adv, average="sequence")
    loss.backward()
    g = x.grad
    assert g[0, 0] == 0 and g[1, 1] == 0                  # pushed past the clip on the side A favours
    assert g[0, 1] != 0 and g[0, 2] != 0 and g[1, 0] != 0  # the other side stays unclipped (min)
    assert met["clip_frac"] == 2 / 5


def test_group_advantages_without_spread_are_zero():
    a = ift.group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]]), "group")
    want = torch.tensor([-1, 0, 1.0], dtype=torch.float64) / (1 + 1e-4)
    assert torch.equal(a[0], torch.zeros(3, dtype=torch.float64)) and torch.allclose(a[1], want)
    assert torch.equal(ift.group_advantages(torch.tensor([[3.0]]), "group"), torch.zeros(1, 1, dtype=torch.float64))
    assert torch.equal(ift.running_advantages([2.0, 2.0], 2.0, 0.0), torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------- verifiers
GSM8K_ROWS = [
    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?",
     "answer": "2 boxes hold 2 * 12 = <<2*12=24>>24 eggs.\n#### 24"},
    {"question": "Tom had 1,250 dollars and spent 250. How much is left?",
     "answer": "1,250 - 250 = <<1250-250=1000>>1,000\n#### 1,000"},
    {"question": "Sam reads 5 pages a day for 6 days. How many pages?",
     "answer": "5 * 6 = <<5*6=30>>30 pages.\n#### 30"},
]
ARC_ROW = {"id": "Mercury_1", "question": {"stem": "Which is a gas at room temperature?", "choices": [
    {"text": "iron", "label": "A"}, {"text": "oxygen", "label": "B"}, {"text": "wood", "label": "C"}]},
    "answerKey": "B"}


def test_gsm8k_and_arc_rewards_read_the_gold_from_the_row():
    r = onpolicy.load_reward("gsm8k")
    assert r("", "3 + 4 = 7\n#### 7", GSM8K_ROWS[0]) == 1.0
    assert r("", "so she has 7 apples.", GSM8K_ROWS[0]) == 1.0            # flexible: the last number
    assert r("", "#### 8 (or 7)", GSM8K_ROWS[0]) == 0.0                  # strict "#### N" wins
    assert r("", "The answer is $1,000.", GSM8K_ROWS[2]) == 1.0           # "," "$" "." dropped as eval_gen does
    assert r("", "no idea", GSM8K_ROWS[1]) == 0.0
    a = onpolicy.load_reward("arc")
    assert a("", "The best answer is B.", ARC_ROW) == 1.0 and a("", "The best answer is C.", ARC_ROW) == 0.0
    assert a("", "B", {**ARC_ROW, "answerKey": "2", "question": {**ARC_ROW["question"], "choices": [
        {**c, "label": str(i + 1)} for i, c in enumerate(ARC_ROW["question"]["choices"])]}}) == 1.0
    # the published rows load as chat examples: the question, and the worked answer / the answer letter
    msgs, _ = data.conversations(GSM8K_ROWS[0])
    assert msgs[0]["content"] == GSM8K_ROWS[0]["question"] and msgs[1]["content"].endswith("#### 7")
    assert data.conversations(ARC_ROW)[0][1]["content"] == "The best answer is B."
    # two-argument reward functions keep working; three-argument ones get the row
    assert not onpolicy.takes_row(onpolicy.demo_reward) and onpolicy.takes_row(r)
    assert onpolicy.score(lambda p, s: len(s), "q", "abc") == 3.0
    assert onpolicy.score(lambda p, s, row: row["k"], "q", "abc", {"k": 2}) == 2.0


def gsm8k_file(tmp_path, n=16):
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(GSM8K_ROWS[i % len(GSM8K_ROWS)]) + "\n" for i in range(n)))
    return str(path)


def test_gsm8k_reward_runs_end_to_end_on_a_gsm8k_file(tmp_path, tok_path, monkeypatch):
    seen = []

    def spy(prompt, response, row):
        seen.append((prompt, row))
        return onpolicy.gsm8k_reward(prompt, response, row)
    monkeypatch.setitem(onpolicy.REWARDS, "gsm8k", spy)
    path = gsm8k_file(tmp_path)
    s = train.main(TINY + [f"--data={path}", f"--tokenizer={tok_path}", "--loss=grpo", "--reward=gsm8k",
                           "--max_steps=2", "--micro_batch_size=2", "--onpolicy_every=2", "--n_samples=2", "--max_new_tokens=6",
                           f"--out_dir={tmp_path / 'run'}"])
    assert s["checkpoint"] and math.isfinite(s["final_train_loss"])
    assert len(seen) == 2 * 2 * 2                        # 2 steps x 2 prompts x 2 samples
    for prompt, row in seen:                             # each sample scored against its own row's gold
        assert row["question"] in prompt
    recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert all("reward_mean" in r and r["ratio_dev"] == 0.0 for r in recs[:1])


def test_arc_reward_runs_on_an_arc_file(tmp_path, tok_path, monkeypatch):
    seen = []

    def spy(prompt, response, row):
        seen.append(row["answerKey"])
        return onpolicy.arc_reward(prompt, response, row)
    monkeypatch.setitem(onpolicy.REWARDS, "arc", spy)
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps({**ARC_ROW, "id": f"q{i}", "answerKey": "ABC"[i % 3]}) + "\n" for i in range(8)))
    train.main(TINY + [f"--data={path}", f"--tokenizer={tok_path}", "--loss=ppo", "--reward=arc", "--max_steps=1",
                       "--micro_batch_size=2", "--onpolicy_every=1", "--n_samples=2", "--max_new_tokens=4",
                       f"--out_dir={tmp_path / 'run'}"])
    assert len(seen) == 4 and set(seen) <= {"A", "B", "C"}


# ----------------------------------------------------------------------------- inside the training loop
REUSED = ["--max_steps=4", "--micro_batch_size=4", "--onpolicy_every=2", "--n_samples=4", "--max_new_tokens=6",
          "--reward=length", "--lr=1e-2", "--clip_low=0.05", "--clip_high=0.05"]


@pytest.mark.parametrize("loss,precision", [("grpo", "fp32"), ("ppo", "fp32"), ("grpo", "bf16")])
def test_reused_round_ratio_is_one_then_clips(tmp_path, tok_path, loss, precision):
    """onpolicy_every=2: steps 1 and 3 are the first after sampling (ratio exactly 1, also under bf16
    autocast: the old log-probs come from the same micro-batches in the same context); steps 2 and 4 reuse
    the round after an update, and the clip then binds on some tokens."""
    train.main(TINY + REUSED + [f"--tokenizer={tok_path}", f"--loss={loss}", f"--precision={precision}",
                                "--kl_coef=0.05", f"--out_dir={tmp_path}"])
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["ratio_dev"] for r in recs[0::2]] == [0.0, 0.0], recs
    assert all(r["ratio_dev"] > 0 for r in recs[1::2]) and max(r["clip_frac"] for r in recs[1::2]) > 0, recs
    assert recs[0]["kl"] == 0.0                           # the policy is the reference at step 0


# ----------------------------------------------------------------------------- distributed, resume
PG_SAMPLED = ["--max_steps=2", "--onpolicy_every=2", "--n_samples=2", "--max_new_tokens=5", "--sample_batch_size=3",
              "--n_eval=12", "--reward=length", "--kl_coef=0.05", "--clip_low=0.05", "--clip_high=0.05"]


@pytest.mark.parametrize("parallel,loss", [("fsdp", "grpo"), ("ddp", "ppo"), ("fsdp", "ppo"), ("ddp", "grpo")])
def test_two_process_pg_run_equals_single_process(tmp_path, tok_path, parallel, loss):
    """One sampling round reused for 2 steps (the second one clipped), KL to a live reference: 2 ranks with
    half the micro-batch each == 1 process (advantages and PPO's running statistics are global)."""
    from test_distributed import GUARD, metrics, single, torchrun
    from test_train import max_diff, weights
    common = TINY + PG_SAMPLED + [f"--tokenizer={tok_path}", f"--loss={loss}"]
    single(common + [f"--out_dir={tmp_path / 'one'}", "--micro_batch_size=8"])
    torchrun([GUARD] + common + [f"--out_dir={tmp_path / 'two'}", "--micro_batch_size=4", f"--parallel={parallel}"])
    r1, r2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert r1[0]["ratio_dev"] == r2[0]["ratio_dev"] == 0.0 and r1[1]["clip_frac"] > 0
    for x, y in zip(r1, r2):
        for k in ("loss", "reward_mean", "kl", "clip_frac", "eval/loss"):
            if k in x:
                assert abs(x[k] - y[k]) < 1e-6, (k, x[k], y[k])
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5


@pytest.mark.parametrize("loss", ["ppo", "grpo"])
def test_resume_inside_a_pg_round_is_bit_identical(tmp_path, tok_path, loss):
    """The checkpoint at step 3 lies inside the round drawn at step 2: the resumed run must reuse its samples,
    advantages and recorded old log-probs (and PPO's running reward statistics), not recompute them."""
    from test_distributed import metrics, run_and_resume_from_step_3
    common = TINY + [f"--tokenizer={tok_path}", f"--loss={loss}", "--onpolicy_every=2", "--n_samples=3",
                     "--max_new_tokens=5", "--reward=length", "--micro_batch_size=4", "--max_steps=6", "--save_every=3",
                     "--clip_low=0.05", "--clip_high=0.05"]
    full, cut = run_and_resume_from_step_3(common, tmp_path)
    ra, rb = metrics(full), metrics(cut)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and ra[3]["ratio_dev"] > 0   # step 4: reused round


# ----------------------------------------------------------------------------- recipes and the demo study
def test_gsm8k_recipes_parse_as_grpo_on_gsm8k():
    for name, world in (("gsm8k_grpo_llama1b", 1), ("gsm8k_grpo_mistral7b", 8)):
        cfg = train.parse_config([f"--config={ROOT}/configs/{name}.json"])
        assert (cfg.loss, cfg.reward, cfg.onpolicy_every, cfg.n_samples) == ("grpo", "gsm8k", 1, 8), name
        assert cfg.micro_batch_size * cfg.grad_accum * world * cfg.n_samples == 128, name   # rows per step


def test_rl_study_quick_runs(tmp_path):
    from experiments import rl_study
    rep = rl_study.main(["--quick", f"--out_dir={tmp_path}"])
    assert len(rep["results"]) == 2 and set(rep["results"][0]) == {"SFT start", "GRPO", "REINFORCE"}
    assert set(rep["comparisons"]) == {"GRPO - SFT start", "GRPO - REINFORCE"}


def test_fsdp_bf16_ratio_is_one_at_the_first_step(tmp_path, tok_path):
    """The GPU path: FSDP2 with bf16 parameters (MixedPrecisionPolicy), 2 ranks; the recorded log-probs come
    from the same sharded forward in the same micro-batches, so the first step of each round has ratio 1."""
    from test_distributed import GUARD, metrics, torchrun
    torchrun([GUARD] + TINY + REUSED + [f"--tokenizer={tok_path}", "--loss=grpo", "--precision=bf16",
                                        "--parallel=fsdp", f"--out_dir={tmp_path}", "--micro_batch_size=2"])
    recs = metrics(tmp_path)
    assert [r["ratio_dev"] for r in recs[0::2]] == [0.0, 0.0] and all(r["ratio_dev"] > 0 for r in recs[1::2]), recs
