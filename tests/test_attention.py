"""Which SDPA calls attention makes: on CUDA a masked call with enable_gqa (or with fewer K/V heads than
query heads) leaves flash (no masks) and memory-efficient (no enable_gqa) for the math kernel, which
materialises fp32 [B,H,T,S] scores. CPU runs every case, so the calls themselves are checked here."""
import pytest
import torch
import torch.nn.functional as F

from generate import generate
from model import ModelArgs, Transformer


def tiny(n_kv, window):
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv, head_dim=8, hidden_dim=48,
                                 vocab_size=64, sliding_window=window)).init_weights(std=0.3, seed=0)


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kw):
        calls.append(dict(masked=attn_mask is not None, gqa=kw.get("enable_gqa", False),
                          q_heads=q.shape[1], kv_heads=(k.shape[1], v.shape[1])))
        return real(q, k, v, attn_mask, *args, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


# (window, left padding, sequence length): the window shorter than the sequence; padding; both; a long
# padded sequence (K/V expanded rather than the mask folded, in training)
CASES = [(4, False, 12), (None, True, 12), (4, True, 12), (None, True, 80)]


@pytest.mark.parametrize("window,padded,T", CASES)
def test_no_masked_call_asks_for_gqa(sdpa_calls, window, padded, T):
    m = tiny(2, window)
    ids = torch.randint(3, 64, (3, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, T, dtype=torch.long)
    if padded:
        mask[1, :T // 2] = 0
    m(ids, attention_mask=mask).square().mean().backward()          # training forward (+ backward)
    prompts = [ids[0].tolist(), ids[1, :3 if padded else T].tolist()]   # unequal lengths: left padding
    generate(m.eval(), prompts, 6, stop_ids=[])                      # prefill + decode steps
    m(ids[:, :4])                                                   # within the window, no padding: no mask
    masked = [c for c in sdpa_calls if c["masked"]]
    assert masked, "the case should need a mask"
    for c in masked:
        assert not c["gqa"] and c["kv_heads"] == (c["q_heads"], c["q_heads"]), c
    maskless = [c for c in sdpa_calls if not c["masked"]]
    assert maskless and all(c["gqa"] for c in maskless)            # flash's native GQA


def test_both_ways_of_removing_gqa_match_sdpa_gqa():
    """Folded queries (short T) and expanded K/V (long T) against SDPA's own enable_gqa, forward and
    backward, with a padding + window mask."""
    from model import attention
    g = torch.Generator().manual_seed(0)
    for T in (3, 40):                                 # 2*B*Hkv*D = 32: T=3 folds, T=40 expands
        q = torch.randn(2, 4, T, 8, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 1, T, 8, generator=g, requires_grad=True) for _ in range(2))
        idx = torch.arange(T)
        mask = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - 5)
        mask = mask[None, None].repeat(2, 1, 1, 1)
        mask[1, :, :, :T // 2] = False
        mask |= torch.eye(T, dtype=torch.bool)
        ours = attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
        g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
