"""model.py against transformers (the oracle), on tiny random checkpoints built here."""
import json
import os

import pytest
import torch

from generate import generate
from infra import hf_io
from infra.hf_io import CheckpointError
from model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 211


def hf_model(kind="mistral", tie=False, window=8, std=0.3, seed=0):
    """Tiny HF model with a large init std: RoPE-layout bugs move logits by far more than 1e-5."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=100,  # 100: not a multiple of 8
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "mistral":
        cfg = transformers.MistralConfig(sliding_window=window, **common)
        m = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        m = transformers.LlamaForCausalLM(cfg)
    m.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return m.eval()


def ids_batch(B=2, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("kind,tie", [("mistral", False), ("mistral", True), ("llama", False), ("llama", True)])
def test_logits_match_transformers(tmp_path, kind, tie):
    hf = hf_model(kind, tie)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_model(tmp_path).eval()
    assert ours.args.sliding_window == (8 if kind == "mistral" else None)
    x = ids_batch(T=24)  # longer than the sliding window (8)
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert ref.abs().max() > 1.0  # the large init actually produced large logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_sharded_checkpoint_matches(tmp_path):
    hf = hf_model("mistral")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ours = hf_io.load_model(tmp_path).eval()
    x = ids_batch()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tie,shard", [(False, 5 * 2**30), (True, 40_000)])
def test_save_pretrained_round_trip_through_transformers(tmp_path, tie, shard):
    hf = hf_model("mistral", tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_io.load_model(tmp_path / "hf").eval()
    hf_io.save_model(ours, tmp_path / "ours", max_shard_bytes=shard)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # temp dir renamed away
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    x = ids_batch()
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)  # same weights, same HF code: bit-identical
        assert (back(x).logits - ours(x)).abs().max().item() <= 1e-5
    # and ours reloads its own output bit-exactly
    again = hf_io.load_model(tmp_path / "ours")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_save_replaces_existing_dir_atomically(tmp_path):
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=40,
                              vocab_size=50)).init_weights(seed=0)
    hf_io.save_model(m, tmp_path / "ck")
    m.init_weights(seed=1)
    hf_io.save_model(m, tmp_path / "ck")
    again = hf_io.load_model(tmp_path / "ck")
    assert torch.equal(again.embed_tokens.weight, m.embed_tokens.weight)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_ids_embeds_padding_and_select_paths():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=100,
                              vocab_size=VOCAB, sliding_window=8)).init_weights(std=0.3, seed=0).eval()
    x = ids_batch(B=3, T=20)
    with torch.no_grad():
        full = m(x)
        assert torch.equal(m(inputs_embeds=m.embed_tokens(x)), full)
        # right-padded batch: each row equals that row alone
        lens = [20, 13, 5]
        padded = x.clone()
        mask = torch.zeros_like(x)
        for b, L in enumerate(lens):
            padded[b, L:] = 0
            mask[b, :L] = 1
        batched = m(padded, attention_mask=mask)
        for b, L in enumerate(lens):
            alone = m(x[b:b + 1, :L])
            assert (batched[b, :L] - alone[0]).abs().max() <= 1e-5
        # selected positions equal the full logits there
        sel = torch.rand(3, 20, generator=torch.Generator().manual_seed(3)) < 0.4
        assert torch.allclose(m(x, select=sel), full[sel], atol=1e-6, rtol=0)
        # IFT mix: lambda 0 or identical ids change nothing; otherwise the embeddings are mixed
        assert torch.equal(m(x, mix_ids=x, mix_lambda=0.3), full)
        other = ids_batch(B=3, T=20, seed=9)
        e = 0.7 * m.embed_tokens(x) + 0.3 * m.embed_tokens(other)
        assert torch.allclose(m(x, mix_ids=other, mix_lambda=0.3), m(inputs_embeds=e), atol=1e-5)


def test_left_padded_forward_matches_unpadded():
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=100,
                              vocab_size=VOCAB, sliding_window=None)).init_weights(std=0.3, seed=0).eval()
    x = ids_batch(B=1, T=10)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        out = m(padded, attention_mask=mask)
        assert torch.isfinite(out).all()
        assert (out[:, 4:] - m(x)).abs().max() <= 1e-5


def greedy_no_cache(model, prompts, n):
    """Reference decoding: re-run the whole left-padded batch for every new token."""
    P = max(map(len, prompts))
    seqs = [[0] * (P - len(p)) + list(p) for p in prompts]
    mask = [[0] * (P - len(p)) + [1] * len(p) for p in prompts]
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor(seqs), attention_mask=torch.tensor(mask))[:, -1]
        for b, t in enumerate(logits.argmax(-1).tolist()):
            seqs[b].append(t)
            mask[b].append(1)
    return [s[P:] for s in seqs]


def test_generation_cache_equals_recompute_equals_transformers(tmp_path):
    hf = hf_model("mistral", window=8, std=0.15)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_model(tmp_path).eval()
    prompts = [[1, 5, 9, 33, 7, 81, 12], [1, 44], [1, 3, 3, 17, 90]]
    n = 40
    got = generate(ours, prompts, n, stop_ids=[])
    assert [len(g) for g in got] == [n] * 3
    assert got == greedy_no_cache(ours, prompts, n)
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    am = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, P:].tolist()
    assert got == ref


def test_generation_stops_per_row_and_sampling_is_seeded():
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, hidden_dim=40,
                              vocab_size=30, sliding_window=None)).init_weights(std=0.5, seed=0).eval()
    prompts = [[1, 4, 5], [1, 9]]
    free = generate(m, prompts, 12, stop_ids=[])
    stop = free[0][3]
    cut = generate(m, prompts, 12, stop_ids=[stop])
    for f, c in zip(free, cut):
        k = f.index(stop) + 1 if stop in f else len(f)
        assert c == f[:k]
    a = generate(m, prompts, 10, temperature=1.0, top_p=0.9, seed=7)
    b = generate(m, prompts, 10, temperature=1.0, top_p=0.9, seed=7)
    c = generate(m, prompts, 10, temperature=1.0, top_p=0.9, seed=8, stop_ids=[])
    assert a == b and a != c
    assert generate(m, prompts, 10, temperature=1.0, top_k=1, seed=3, stop_ids=[]) == [f[:10] for f in free]


def write_tiny(tmp_path, tie=False):
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=40,
                              vocab_size=50, tie_word_embeddings=tie)).init_weights(seed=0)
    hf_io.save_model(m, tmp_path)
    return m


def test_bad_checkpoints_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file
    write_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(f)

    bad = dict(good); bad.pop("model.layers.0.mlp.up_proj.weight"); save_file(bad, f)
    with pytest.raises(CheckpointError, match="missing.*model.layers.0.mlp.up_proj.weight"):
        hf_io.load_model(tmp_path)
    bad = dict(good); bad["model.layers.0.extra.weight"] = torch.zeros(2); save_file(bad, f)
    with pytest.raises(CheckpointError, match="unexpected key 'model.layers.0.extra.weight'.*"):
        hf_io.load_model(tmp_path)
    bad = dict(good); bad["model.norm.weight"] = torch.zeros(31); save_file(bad, f)
    with pytest.raises(CheckpointError, match=r"model.norm.weight' has shape \(31,\), expected \(32,\)"):
        hf_io.load_model(tmp_path)
    save_file(good, f)

    cfg = json.loads((tmp_path / "config.json").read_text())
    broken = dict(cfg); broken.pop("num_hidden_layers")
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="config.json: missing required field 'num_hidden_layers'"):
        hf_io.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("model.safetensors" if i else "model-00002-of-00002.safetensors")
                        for i, k in enumerate(good)}}))
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors'"):
        hf_io.load_model(tmp_path)


def test_config_dialects():
    base = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, model_type="mistral")
    v01 = hf_io.args_from_hf_config(dict(base, rope_theta=10000.0, sliding_window=4096))
    v4 = hf_io.args_from_hf_config(dict(base, rope_theta=1e6, head_dim=None, sliding_window=None))
    v5 = hf_io.args_from_hf_config(dict(base, head_dim=128, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                                       dtype="bfloat16", vocab_size=32768))
    assert (v01.head_dim, v01.rope_theta, v01.sliding_window) == (128, 1e4, 4096)
    assert (v4.head_dim, v4.rope_theta, v4.sliding_window) == (128, 1e6, None)
    assert (v5.head_dim, v5.rope_theta, v5.vocab_size) == (128, 1e6, 32768)
    with pytest.raises(CheckpointError, match="rope type 'llama3'"):
        hf_io.args_from_hf_config(dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_mistral_7b_parameter_count_and_flops():
    with torch.device("meta"):
        m = Transformer(ModelArgs())
    assert m.num_params() == 7_241_732_096
    n_matmul = 7_241_732_096 - 32000 * 4096
    assert m.flops_per_token(1024) == 6 * n_matmul + 12 * 32 * 32 * 128 * 1024
