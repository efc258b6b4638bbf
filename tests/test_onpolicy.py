"""On-policy mode of train.py (onpolicy.py): sampling from current weights, rewards, pairs, DDP."""

import pytest
import torch

import data
import onpolicy
import tokenizer
import train
from generate import generate
from infra import checkpoint, hf_io
from test_train import TINY


def sevens(prompt, response):
    """A reward for a token the random-init reference almost never emits (p ~ 1/320 per token)."""
    return response.count("7") / 8.0


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tokenizer.train_tokenizer(data.corpus_text(data.synthetic_task(300, 0)), str(d / "tok"), 320)
    return str(d / "tok.model")


def mean_reward(ckpt, tok, n=32):
    m = hf_io.load_model(ckpt).eval()
    prompts = [tokenizer.render_chat(tok, r["messages"][:1], add_generation_prompt=True)[0]
               for r in data.synthetic_task(n, 99)]
    outs = generate(m, prompts * 4, 8, temperature=1.0, seed=0, stop_ids=[tok.eos_id])
    return sum(sevens("", tok.decode(o)) for o in outs) / len(outs)


def test_onpolicy_dpo_beats_offline_dpo_on_a_rare_reward(tmp_path, tok_path):
    tok = tokenizer.Tokenizer(tok_path)
    gaps = []
    for seed in (0, 1):
        r = {}
        for mode in ("onpolicy", "offline"):   # same steps, lr, prompts; only where samples come from
            s = train.main(TINY + [f"--tokenizer={tok_path}", "--loss=dpo", "--max_steps=40", "--micro_batch_size=8",
                                   "--onpolicy_every=1", f"--sampling={mode}", "--n_samples=8", "--max_new_tokens=8",
                                   "--reward=test_onpolicy:sevens", "--pair_threshold=0.05", "--lr=1e-2",
                                   f"--seed={seed}", f"--out_dir={tmp_path / f'{mode}{seed}'}"])
            r[mode] = mean_reward(s["checkpoint"], tok)
        gaps.append(r["onpolicy"] - r["offline"])
    assert min(gaps) > 0.2, gaps   # measured: 0.52 and 0.43


def test_samples_come_from_the_current_weights(tok_path):
    tok = tokenizer.Tokenizer(tok_path)
    cfg = train.parse_config(["--loss=sft", "--onpolicy_every=1", "--n_samples=3", "--max_new_tokens=5"])
    ex, _ = data.load_sft(data.synthetic_task(4, 0), tok)
    m = train.build_model(train.parse_config(TINY), tok, torch.device("cpu"))
    sampler = onpolicy.Sampler(cfg, tok, ex, 0, 1)
    sampler.refresh(m, 0, [0, 1], torch.device("cpu"))
    assert set(sampler.samples) == {0, 1} and all(len(o) == 3 for o, _ in sampler.samples.values())
    def expected(model, step, i):   # what `model` itself samples for prompt i in that round
        return generate(model, [onpolicy.prompt_of(ex[i])] * 3, 5, temperature=1.0, top_p=1.0,
                              row_seeds=[onpolicy.stable_seed(cfg.seed, step, i, j) for j in range(3)],
                              stop_ids=[tok.eos_id])
    assert sampler.samples[1][0] == expected(m, 0, 1)
    old = train.build_model(train.parse_config(TINY), tok, torch.device("cpu"))
    m.init_weights(std=0.3, seed=5)           # new weights between rounds
    sampler.refresh(m, 1, [0, 1], torch.device("cpu"))
    for i in (0, 1):
        assert sampler.samples[i][0] == expected(m, 1, i)
        assert sampler.samples[i][0] != expected(old, 1, i)


def test_training_loop_resamples_with_the_live_weights(tmp_path, tok_path, monkeypatch):
    seen = []
    orig = onpolicy.Sampler.refresh

    def spy(self, model, step, indices, device, *a, **kw):
        seen.append((step, model.norm.weight.detach().clone()))
        return orig(self, model, step, indices, device, *a, **kw)
    monkeypatch.setattr(onpolicy.Sampler, "refresh", spy)
    train.main(TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--max_steps=4", "--micro_batch_size=4",
                       "--onpolicy_every=2", "--n_samples=2", "--max_new_tokens=4", f"--out_dir={tmp_path}"])
    assert [s for s, _ in seen] == [0, 2]
    final = hf_io.load_model(checkpoint.list_checkpoints(str(tmp_path))[-1])
    assert not torch.equal(seen[0][1], seen[1][1])            # round 2 saw trained weights
    assert not torch.equal(seen[1][1], final.norm.weight)     # and they were live, not a final copy


def test_pairs_respect_threshold_and_best_of_n_is_the_argmax(tok_path):
    s = [[1], [2], [3], [4]]
    assert onpolicy.make_pairs(s, [0.1, 0.9, 0.5, 0.85], "best_worst", 0.2) == [([2], [1])]
    assert onpolicy.make_pairs(s, [0.1, 0.2, 0.15, 0.25], "best_worst", 0.2) == []
    allp = onpolicy.make_pairs(s, [0.0, 1.0, 0.5, 0.45], "all", 0.2)
    assert sorted(allp) == sorted([([2], [1]), ([2], [3]), ([2], [4]), ([3], [1]), ([4], [1])])
    tok = tokenizer.Tokenizer(tok_path)
    cfg = train.parse_config(["--loss=ift", "--onpolicy_every=1"])
    ex, _ = data.load_sft(data.synthetic_task(2, 0), tok)
    sampler = onpolicy.Sampler(cfg, tok, ex, 0, 1)
    sampler.samples = {0: ([[5, 6], [7, 8, 2], [9]], [0.2, 0.7, 0.1]), 1: ([[4], [3]], [1.0, 0.0])}
    b, _ = sampler.batch([0, 1], None, torch.device("cpu"))
    for row, prompt, best in zip(range(2), (onpolicy.prompt_of(ex[0]), onpolicy.prompt_of(ex[1])), ([7, 8, 2], [4])):
        n = int(b["attention_mask"][row].sum())
        assert b["input_ids"][row, :n].tolist() == prompt + best
        assert [l for l in b["labels"][row].tolist() if l != -100] == best


def test_bad_reward_functions_are_named():
    def boom(p, r):
        raise KeyError("score")

    def nan(p, r):
        return float("nan")
    with pytest.raises(RuntimeError, match="reward function .*boom raised KeyError"):
        onpolicy.score(boom, "q", "a")
    with pytest.raises(RuntimeError, match="reward function .*nan returned a non-finite value nan"):
        onpolicy.score(nan, "q", "a")
    with pytest.raises(ValueError, match="cannot load"):
        onpolicy.load_reward("no_such_module:f")
    assert onpolicy.load_reward("test_onpolicy:sevens")("", "77") == 0.25
