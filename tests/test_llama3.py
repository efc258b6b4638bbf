"""Llama-3 and other Hugging Face chat checkpoints: tokenizer.json + the checkpoint's own chat template
(ids equal transformers' apply_chat_template, exact supervised spans), llama3 RoPE scaling parity, and
train.py / eval_gen.py end to end on a tiny tokenizer.json checkpoint. Tokenizers are trained here."""
import json
import os

import pytest
import torch

from model import CheckpointError, ModelArgs, Transformer

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


# ------------------------------------------------------------------------------ llama3 rope scaling
def hf_llama3(vocab=101, tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                                   tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    m = transformers.LlamaForCausalLM(cfg)
    m.config._attn_implementation = "sdpa"   # ours is SDPA too: eager alone differs by ~1.5e-5 here
    with torch.no_grad():   # large init: RoPE errors move logits far beyond 1e-5
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.3)
    return m.eval()


def test_llama3_rope_scaling_logits_match_transformers(tmp_path):
    hf = hf_llama3()
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf").eval()
    assert ours.args.rope_scaling == LLAMA3_ROPE and ours.args.rope_theta == 500000.0
    x = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None].expand(2, -1) + 300   # past original_max_position_embeddings (64)
    with torch.no_grad():
        ref = hf(x, position_ids=pos).logits
        assert (ours(x, position_ids=pos) - ref).abs().max().item() <= 1e-5
        plain = Transformer(ModelArgs(**{**vars(ours.args), "rope_scaling": None}))
        plain.load_state_dict(ours.state_dict())
        assert (plain(x, position_ids=pos) - ref).abs().max().item() > 1e-2   # the scaling matters here
        # our checkpoint (4.x dialect: top-level rope_theta + rope_scaling) reads back in transformers
        ours.save_pretrained(tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa").eval()
        assert (back(x, position_ids=pos).logits - ref).abs().max().item() <= 1e-5
        # and generation (its own RoPE tables) continues the way a full forward does
        out = ours.generate([x[0, :12].tolist()], 6)[0]
        full = ours(torch.tensor([x[0, :12].tolist() + out[:-1]]))[0, 11:].argmax(-1).tolist()
        assert out == full


def test_rope_types_read_and_refused():
    base = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                vocab_size=50, rope_theta=500000.0)
    a = ModelArgs.from_hf_config({**base, "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}})
    assert a.rope_scaling == LLAMA3_ROPE                      # old "type" key
    b = ModelArgs.from_hf_config({**base, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}})
    assert b.rope_scaling == LLAMA3_ROPE and b.rope_theta == 500000.0   # transformers 5.x dialect
    assert ModelArgs.from_hf_config({**base, "rope_scaling": None}).rope_scaling is None
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="cfg.json: rope type 'llama3' needs high_freq_factor"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items()
                                                           if k != "high_freq_factor"}}, "cfg.json")
