"""
A handwritten Mistral / Llama decoder that loads and saves Hugging Face safetensors checkpoints
and produces the same logits as `transformers` (fp32, <= 1e-5), plus static-KV-cache generation.

Module names mirror Hugging Face's, so a checkpoint key is our parameter name with "model." in
front (except lm_head.weight): no renaming table to get wrong.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class CheckpointError(ValueError):
    """A checkpoint directory that does not match what the model expects."""


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

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read any of the three config.json dialects (Mistral v0.1, transformers 4.x, 5.x)."""
        def need(key):
            if key not in cfg or cfg[key] is None:
                raise CheckpointError(f"{source}: missing required field '{key}'")
            return cfg[key]
        mtype = cfg.get("model_type", "mistral")
        if mtype not in ("mistral", "llama"):
            raise CheckpointError(f"{source}: model_type '{mtype}' is not supported (mistral, llama)")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise CheckpointError(f"{source}: '{key}: true' is not supported (this model has no biases)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope type '{kind}' is not supported (default, llama3)")
        scaling = None
        if kind == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if rope.get(k) is None]
            if missing:
                raise CheckpointError(f"{source}: rope type 'llama3' needs {', '.join(missing)}")
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}}
        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        eos = cfg.get("eos_token_id", 2)
        return cls(
            dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            hidden_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            # HF's MistralConfig defaults a missing sliding_window to 4096; Llama has none.
            sliding_window=cfg.get("sliding_window", 4096) if mtype == "mistral" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, model_type=mtype, rope_scaling=scaling)

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """transformers-4.x dialect (top-level rope_theta, integer head_dim); 5.x reads it too."""
        arch = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        cfg = {"architectures": [arch], "model_type": self.model_type, "hidden_size": self.dim,
               "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
               "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
               "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size,
               "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "hidden_act": "silu",
               "max_position_embeddings": self.max_position_embeddings,
               "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
               "eos_token_id": self.eos_token_id, "attention_dropout": 0.0,
               "torch_dtype": str(dtype).removeprefix("torch.")}
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        else:
            cfg.update(attention_bias=False, mlp_bias=False)
        return cfg


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

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k=None,
                 top_p=None, seed=None, row_seeds=None, stop_ids=None, pad_id=None,
                 until_all_stop: bool = True, stop_fn=None, compile: bool = False):
        """Batched generation over prompts of different lengths (left-padded, static KV cache).
        Returns the new ids of each prompt, the stop token included when hit and nothing after it.
        seed: one generator for the whole batch. row_seeds: one seed per prompt, each row drawing
          from its own generator, so a row's sample does not depend on which rows share its batch or
          how they are padded (exact up to logits rounding). Greedy (temperature 0) needs neither.
        stop_fn(row, new_ids) -> bool: called on the host after every step for each running row
          (e.g. "the decoded text holds a stop string"); True ends that row there, like a stop id.
        until_all_stop=False always runs max_new_tokens steps (FSDP ranks must forward in lockstep).
        compile=True: torch.compile the fixed-shape one-token step (mode="reduce-overhead", i.e.
          CUDA graphs, on CUDA); the cache is kept between calls (clear_cache() frees it).
        Every model computation goes through self(...) (forward), never embed/trunk/lm_head alone."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"generate: {len(row_seeds)} row_seeds for {len(prompts)} prompts")
        # inference_mode trims per-op overhead; FSDP2 must not allocate its gather buffers under it.
        fsdp = hasattr(self, "reshard")
        with torch.no_grad() if fsdp else torch.inference_mode():
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, row_seeds,
                                  stop_ids, pad_id, until_all_stop, stop_fn, compile)

    def _generate(self, prompts, n_new, temperature, top_k, top_p, seed, row_seeds, stop_ids, pad_id,
                  until_all_stop, stop_fn, compile):
        dev = self.embed_tokens.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        stop = torch.tensor(stop_ids if stop_ids is not None else [self.args.eos_token_id], device=dev)
        pad = pad_id if pad_id is not None else self.args.eos_token_id
        ids = torch.full((B, P), pad, dtype=torch.long, device=dev)
        valid = torch.ones(B, P, dtype=torch.bool, device=dev)   # False = a left-padding slot
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = torch.tensor(p, device=dev)
            valid[b, :P - len(p)] = False
        valid = valid if any(len(p) < P for p in prompts) else None   # no padding: maskless prefill
        pos = torch.arange(P, device=dev)[None].expand(B, P) if valid is None else \
            (valid.long().cumsum(-1) - 1).clamp(min=0)
        # Compiled: round the cache up so nearby prompt lengths share one compiled step / CUDA graph.
        S = self.setup_cache(B, -(-(P + n_new) // 256) * 256 if compile else P + n_new, valid, keep=compile)
        slots = torch.arange(S, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None and row_seeds is None else None
        row_gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in row_seeds] \
            if row_seeds is not None and temperature > 0 else None
        step = _compiled_step(dev.type) if compile else _step
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out, alive, hist = [], [], [[] for _ in range(B)]
        try:
            logits = self(ids, position_ids=pos, input_pos=slots[:P])[:, -1]
            next_pos = pos[:, -1:] + 1
            for i in range(n_new):
                tok = sample(logits.float(), temperature, top_k, top_p, gen, row_gens)
                tok = torch.where(done, torch.full_like(tok, pad), tok)
                out.append(tok)
                alive.append(~done)
                done = done | torch.isin(tok, stop)
                if stop_fn is not None:   # one host sync per step
                    hit = []
                    for b, (t, d, a) in enumerate(zip(tok.tolist(), done.tolist(), alive[-1].tolist())):
                        if a:
                            hist[b].append(t)
                        hit.append(a and not d and bool(stop_fn(b, hist[b])))
                    done = done | torch.tensor(hit, device=dev)
                if (until_all_stop and bool(done.all())) or i == n_new - 1:
                    break
                logits = step(self, tok[:, None], next_pos, slots[P + i:P + i + 1])
                if compile:   # under CUDA graphs the output buffer is overwritten by the next replay
                    logits = logits.clone()
                next_pos = next_pos + 1
        finally:
            if not compile:
                self.clear_cache()
        lengths = torch.stack(alive, 1).sum(1).tolist()
        return [row[:n] for row, n in zip(torch.stack(out, 1).tolist(), lengths)]

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Load a Hugging Face checkpoint directory (single file or shards). Built on the meta device
        and filled tensor by tensor with assign=True, so a 7B load never holds two copies in RAM."""
        args, cfg_path = read_args(path), os.path.join(path, "config.json")
        dtype = dtype or torch.float32
        with torch.device("meta"):
            model = cls(args)
        expected = {n: p.shape for n, p in model.named_parameters()}  # tied: no lm_head.weight
        files = _weight_files(path)
        state = {}
        for fname, keys in files.items():
            with _open_safetensors(fname) as f:
                present = set(f.keys())
                for key in keys if keys is not None else sorted(present):
                    if key not in present:
                        raise CheckpointError(f"{fname}: index says it holds '{key}', but it does not")
                    name = key[len("model."):] if key.startswith("model.") else key
                    if name.endswith("rotary_emb.inv_freq") or (args.tie_word_embeddings and name == "lm_head.weight"):
                        continue  # recomputed / tied: stored copies are redundant
                    if name not in expected:
                        raise CheckpointError(f"{fname}: unexpected key '{key}'")
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(expected[name]):
                        raise CheckpointError(f"{fname}: '{key}' has shape {tuple(t.shape)}, "
                                              f"expected {tuple(expected[name])} from {cfg_path}")
                    state[name] = t.to(device=device, dtype=dtype)
        missing = [n for n in expected if n not in state]
        if missing:
            raise CheckpointError(f"{path}: missing key(s) {', '.join('model.' + m if m != 'lm_head.weight' else m for m in missing[:5])}"
                                  + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        model.load_state_dict(state, strict=False, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def save_pretrained(self, path, state_dict=None, dtype=None, max_shard_bytes: int = 5 * 2**30,
                        extra_files: Optional[dict] = None):
        """Write an HF-layout checkpoint to a temp dir beside `path`, then rename it into place, so a
        crash never leaves a half-written directory where a good one was."""
        atomic_dir(path, lambda tmp: write_checkpoint(tmp, self.args, state_dict or self.state_dict(),
                                                      dtype, max_shard_bytes, extra_files))


def _step(model, tok, position_ids, input_pos):
    """One decode step through forward: fixed shapes ([B,1] token and positions, [1] slot), which
    is what makes it compilable and CUDA-graph capturable."""
    return model(tok, position_ids=position_ids, input_pos=input_pos)[:, -1]


_COMPILED = {}


def _compiled_step(device_type: str):
    if device_type not in _COMPILED:   # one compiled function per device type; dynamo caches per shape
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_step, mode=mode, fullgraph=True)
    return _COMPILED[device_type]


def sample(logits, temperature: float, top_k=None, top_p=None, generator=None, row_generators=None):
    """logits [B,V] fp32 -> token ids [B]. Greedy when temperature == 0. row_generators: one
    torch.Generator per row; row b's draw then uses only its own generator (exponential race:
    argmax p / E with E = -log U, U ~ uniform from that generator, which samples p exactly)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p        # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    if row_generators is not None:
        V = probs.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=probs.device) for g in row_generators])
        return (probs / -torch.log(u)).argmax(-1)     # U = 0 -> E = inf -> never chosen
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def read_args(path) -> ModelArgs:
    """ModelArgs of a Hugging Face checkpoint directory, from its config.json."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    return ModelArgs.from_hf_config(cfg, cfg_path)


def _open_safetensors(fname):
    """safe_open, with a truncated or foreign file reported as a CheckpointError naming it (safetensors
    checks the header against the file size, so a cut-off download fails here, not mid-load)."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(fname, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fname}: not a readable safetensors file ({e}); re-download or re-save it") from None


def read_trainer_state(path):
    """torch.load of a trainer_state.pt; a file cut short or overwritten is a CheckpointError naming it
    (a user error: resume from the checkpoint before), not a traceback from deep inside torch."""
    try:
        state = torch.load(path, weights_only=True)
        missing = [k for k in ("rng", "step", "epoch") if k not in state]   # optimizer: in dcp/ or here (old)
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt trainer state, cannot resume from it ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:160]}); move {os.path.dirname(path)} "
                              f"aside to resume from the checkpoint before") from None
    return state


def _weight_files(path):
    """{file: keys-it-should-hold or None (= all)} for a single file or an index of shards."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {}
        for key, shard in weight_map.items():
            fname = os.path.join(path, shard)
            if not os.path.isfile(fname):
                raise CheckpointError(f"{index}: names shard '{shard}' (for '{key}'), which does not exist")
            files.setdefault(fname, []).append(key)
        return files
    if os.path.isfile(single):
        return {single: None}
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def write_checkpoint(out_dir, args: ModelArgs, state_dict, dtype=None, max_shard_bytes=5 * 2**30,
                     extra_files: Optional[dict] = None):
    """Write config.json + safetensors (sharded above max_shard_bytes) into an existing directory."""
    from safetensors.torch import save_file
    tensors = {}
    for name, t in state_dict.items():
        if args.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: HF stores the table once
        key = name if name == "lm_head.weight" else "model." + name
        t = t.detach()
        tensors[key] = (t.to(dtype) if dtype else t).to("cpu").contiguous()
    shards, cur, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[key], size = t, size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    saved_dtype = dtype or next(iter(tensors.values())).dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(args.to_hf_config(saved_dtype), f, indent=2)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(out_dir, name))


def _honour_umask(root):
    """mkdtemp makes 0700 dirs (and some writers 0600 files): give the tree the modes any file the user
    creates gets, so colleagues on a shared filesystem can read a checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o777 & ~umask)
        for n in files:
            os.chmod(os.path.join(d, n), 0o666 & ~umask)


def atomic_dir(path, write_fn):
    """Run write_fn(tmp_dir) on a fresh temp dir beside `path`, then swap it into place."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        write_fn(tmp)
        swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(root):
    """Flush every file under `root` and the directories themselves to disk: a rename is only as durable
    as what it names, and after a power cut a renamed directory of unflushed files is a corrupt checkpoint."""
    for d, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


def _fsync_dir(d):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(tmp, path):
    """Flush the finished temp dir `tmp`, then rename it to `path` (the old `path`, if any, moved aside
    first and deleted after) and flush the parent so the rename itself survives a crash."""
    parent = os.path.dirname(path)
    _honour_umask(tmp)
    fsync_tree(tmp)
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{os.path.basename(path)}-")
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_dir(parent)
