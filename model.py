"""
A handwritten Mistral / Llama decoder with the same logits as `transformers` (fp32, <= 1e-5), and its
static KV cache. Module names mirror Hugging Face's, so a checkpoint key is our parameter name with
"model." in front (except lm_head.weight): hf_io.py reads and writes them with no renaming table.
Generation (prefill, decode, sampling) is generate.py.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336          # SwiGLU intermediate size
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = 4096   # None = full causal attention
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "mistral"      # "mistral" or "llama" (only changes config.json and sliding window)
    rope_scaling: Optional[dict] = None   # Llama-3.1/3.2's {"rope_type": "llama3", factor, ...}; None = plain RoPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back *before* the weight multiply: HF's order, needed for parity.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_cos_sin(position_ids, head_dim: int, theta: float, scaling: Optional[dict] = None):
    """cos/sin [B, T, head_dim] in fp32, rotate_half layout (the two halves share frequencies).
    scaling: Llama-3.1's "llama3" frequency rescaling (ModelArgs.rope_scaling), or None."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def llama3_inv_freq(inv_freq, s: dict):
    """Llama-3.1's long-context RoPE, in transformers' operation order (parity to fp32 rounding):
    wavelengths shorter than original_max / high_freq_factor stay, longer than original_max /
    low_freq_factor are stretched by `factor`, and the band between is interpolated smoothly."""
    factor, low, high, old = (s[k] for k in LLAMA3_ROPE_KEYS)
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    # HF checkpoints store q/k rows permuted for this "rotate_half" layout, so no un-permutation here.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype)


class KVCache(nn.Module):
    """Static, preallocated cache (gpt-fast style): fixed shapes so decoding can be compiled.
    The buffers take the dtype of the first keys written (the compute dtype: bf16 under autocast or
    FSDP2's bf16 param_dtype, whatever the master weights are), so no step ever converts the cache."""
    def __init__(self, batch, n_kv_heads, max_len, head_dim, device):
        super().__init__()
        self.shape, self.device = (batch, n_kv_heads, max_len, head_dim), device
        # Registered buffers (not plain attributes): torch.compile / CUDA graphs then treat them as
        # static inputs mutated in place.
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)

    def update(self, input_pos, k, v):
        if self.k is None or self.k.dtype != k.dtype:   # first write (eager prefill)
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=self.device)
            self.v = torch.zeros(self.shape, dtype=k.dtype, device=self.device)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def attention(q, k, v, mask):
    """q [B,H,T,D] against k/v [B,Hkv,S,D] (training: S = T; generation: the cache or, in prefill, the
    prompt's own keys); mask None = plain causal, else bool [B|1,1,T,S]. Kernels on CUDA (torch 2.11,
    bf16/fp16):
    - no mask: is_causal + enable_gqa -> flash attention, which takes GQA natively;
    - a mask (sliding window shorter than T, left padding, the cache's unwritten slots): flash refuses
      any mask and the memory-efficient kernel refuses enable_gqa, so with GQA SDPA would fall to the
      math kernel (fp32 [B,H,T,S] scores). So a masked call never passes enable_gqa; instead, whichever
      copy is smaller:
      * fold each kv head's G query heads into the query axis: q [B,Hkv,G*T,D] against K/V as they
        are, the mask repeated G times along the queries (b*G*T*S bools, and SDPA's additive bias of
        that size; a stride-0 view when T == 1). Exactly GQA: every query row is its own softmax. A
        decode step (T = 1) and a short prefill take this: no copy of the cache at all;
      * expand K/V to H heads (repeat_interleave: 2*B*H*S*D values). A long training sequence takes
        this: its [T,T] mask (broadcast over heads, and over rows without padding) grows with T*T,
        G*T*T folded, while K/V grow with T; the copies are kept for backward either way (autograd
        sums the G copies' gradients back into each kv head).
    On CPU every case goes to the CPU flash kernel, which takes masks. (The CUDA choice follows torch
    2.11's SDPA constraints; it has not been profiled on a GPU in this repository yet.)"""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, S = mask.shape[0], mask.shape[-1]
    if b * T <= 2 * B * Hkv * D:   # folded mask (b*G*T*S) no larger than expanded K/V (2*B*Hkv*G*S*D)
        m = mask[:, :, None].expand(b, 1, G, T, S).reshape(b, 1, G * T, S)
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, D), k, v, attn_mask=m)
        return y.view(B, H, T, D)
    # Query head h reads kv head h // G: SDPA's enable_gqa grouping, so repeat_interleave, not repeat.
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None and input_pos is not None:
            ck, cv = self.cache.update(input_pos, k, v)
            # Prefill (T > 1, slots 0..T-1) attends to its own keys only; a decode step to the cache.
            y = attention(q, k, v, mask) if T > 1 else attention(q, ck, cv, mask)
        else:
            y = attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.up_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.down_proj = nn.Linear(a.hidden_dim, a.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn, self.mlp = Attention(a), MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False
        self._gen = None          # generation tables, set by setup_cache

    # ---------------------------------------------------------------- helpers
    def init_weights(self, std: float = 0.02, seed: Optional[int] = None):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates a tied table
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight (fwd + bwd) + attention scores/values
        (12·L·H·hd·T, as nanoGPT/torchtitan; the embedding lookup is no matmul, the window caps T)."""
        a = self.args
        t = min(seq_len, a.sliding_window or seq_len)
        return 6 * self.num_params(exclude_embedding=not a.tie_word_embeddings) \
            + 12 * a.n_layers * a.n_heads * a.head_dim * t

    def set_activation_checkpointing(self, on: bool = True):
        self.grad_checkpointing = on

    def setup_cache(self, batch: int, max_len: int, valid=None, keep: bool = False) -> int:
        """One KVCache per layer, plus the generation tables (gpt-fast style: built once, indexed per
        step): RoPE cos/sin per position and the [B|1,1,S,S] mask over cache slots (causal, window,
        and valid [B,<=S]: False = a left-padding slot; None = no padding). Returns the cache length.
        keep=True (compiled generation) reuses a cache of the same batch that is long enough, and its
        tables: the new mask is written into the old one's storage. The compiled step reads them all
        as module state, which CUDA graphs take as fixed addresses: same storage, no re-record."""
        cache = self.layers[0].self_attn.cache
        reuse = keep and cache is not None and cache.shape[0] == batch and cache.shape[2] >= max_len \
            and self._gen is not None
        if not reuse:
            dev = self.embed_tokens.weight.device
            for layer in self.layers:
                layer.self_attn.cache = KVCache(batch, self.args.n_kv_heads, max_len, self.args.head_dim, dev)
        S, dev = self.layers[0].self_attn.cache.shape[2], self.layers[0].self_attn.cache.device
        slots = torch.arange(S, device=dev)
        if valid is not None and valid.shape[1] < S:
            valid = torch.cat([valid, valid.new_ones(batch, S - valid.shape[1])], 1)
        mask = self._allowed(slots, S, valid, dev)
        if keep:   # one shape (and strides) with or without padding: one compiled step
            mask = mask.expand(batch, -1, -1, -1).contiguous()
        if reuse and self._gen["mask"].shape == mask.shape:   # cos/sin depend on S only: unchanged
            self._gen["mask"].copy_(mask)
        else:
            cos, sin = rope_cos_sin(slots[None], self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
            self._gen = {"cos": cos[0], "sin": sin[0], "mask": mask}
        self._gen["padded"] = valid is not None
        return S

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None
        self._gen = None

    def _mask(self, q_idx, n_keys, attention_mask, device):
        """Boolean [B|1, 1, Tq, S] mask, or None when plain causal attention is exact (fast path)."""
        w = self.args.sliding_window
        T = q_idx.numel()
        if attention_mask is None and n_keys == T and (w is None or T <= w):
            return None
        return self._allowed(q_idx, n_keys, attention_mask, device)

    def _allowed(self, q_idx, n_keys, attention_mask, device):
        w = self.args.sliding_window
        k_idx = torch.arange(n_keys, device=device)
        allowed = k_idx[None, :] <= q_idx[:, None]               # causal
        if w is not None:
            allowed = allowed & (k_idx[None, :] > q_idx[:, None] - w)   # HF: 0 <= i - j < window
        allowed = allowed[None]
        if attention_mask is not None:
            # A padding query would see no key at all (NaN rows that leak through V in later layers):
            # let every query see itself. Real queries are unaffected.
            allowed = allowed & attention_mask[:, None, :n_keys].bool() | (k_idx[None, :] == q_idx[:, None])
        return allowed[:, None]

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                mix_ids=None, mix_lambda: float = 0.0, freeze_embeddings: bool = False,
                select=None, return_hidden: bool = False, input_pos=None):
        """input_ids [B,T] or inputs_embeds [B,T,D] -> logits [B,T,V].
        attention_mask [B,T]: 1 = token, 0 = padding (left or right); positions then count tokens only.
        input_pos [T] (generation, after setup_cache): the cache slots of these tokens (a prefill
          starts at slot 0); position_ids [B,T] (RoPE positions) are then required, padding comes
          from setup_cache's `valid`, and only the last position's logits come back, [B,1,V].
          Generation calls the model this way, through __call__, so FSDP2's root hooks gather
          embed_tokens / norm / lm_head.
        mix_ids/mix_lambda: IFT's temporal residual connection, (1-λ)E(ids) + λE(mix_ids), computed
          here so the (possibly FSDP-sharded) embedding table is only touched inside forward.
        select: bool [B,T] -> logits only at those positions, [N,V] (a 32k vocab never materialised
          for prompt tokens). return_hidden: final-norm hidden states instead of logits."""
        h = inputs_embeds if inputs_embeds is not None else \
            self.embed(input_ids, mix_ids, mix_lambda, freeze_embeddings)
        if input_pos is not None:
            if attention_mask is not None:
                raise ValueError("forward: with input_pos, padding is setup_cache's `valid`, not attention_mask")
            return self._cached_forward(h, position_ids, input_pos)
        B, T = h.shape[:2]
        if attention_mask is not None and position_ids is None \
                and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            attention_mask = None  # right padding: causal attention is already exact for real tokens
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None \
                else torch.arange(T, device=h.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        q_idx = torch.arange(T, device=h.device)
        h = self.trunk(h, cos, sin, self._mask(q_idx, T, attention_mask, h.device))
        if select is not None:
            h = h[select]
        return h if return_hidden else self.lm_head(h)

    def _cached_forward(self, h, position_ids, input_pos):
        g, T, w = self._gen, h.shape[1], self.args.sliding_window
        cos, sin = g["cos"][position_ids], g["sin"][position_ids]
        if T > 1:   # prefill from slot 0: queries see keys 0..T-1; no padding -> maskless (flash)
            mask = g["mask"][:, :, :T, :T] if g["padded"] or (w is not None and T > w) else None
        else:       # decode: the whole cache, minus padding, unwritten slots and the window
            mask = g["mask"][:, :, input_pos]
        h = self.trunk(h, cos, sin, mask, input_pos)
        return self.lm_head(h[:, -1])[:, None]

    def embed(self, input_ids, mix_ids=None, mix_lambda=0.0, freeze_embeddings=False):
        W = self.embed_tokens.weight.detach() if freeze_embeddings else self.embed_tokens.weight
        if mix_ids is None or mix_lambda == 0.0:
            return F.embedding(input_ids, W)
        e, e_mix = F.embedding(torch.stack([input_ids, mix_ids]), W)   # one lookup: one backward scatter
        mixed = (1.0 - mix_lambda) * e + mix_lambda * e_mix
        return torch.where((mix_ids == input_ids)[..., None], e, mixed)  # exact where guess == truth

    def trunk(self, h, cos, sin, mask, input_pos=None):
        """The blocks + final norm. input_pos: cache slots of these tokens (generation only)."""
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, input_pos, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, input_pos)
        return self.norm(h)
