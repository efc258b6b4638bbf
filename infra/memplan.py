"""
What a run needs per device, from the config alone: a memory plan printed at start (and a clear refusal
when it cannot fit), the load's peak, and the throughput numbers of the log (tokens/s, MFU).

The plan is arithmetic, not a measurement; its terms per GPU (GiB):
  params     fp32 master weights (1/world of them under FSDP2)
  grads      fp32 gradients (FSDP2: the sharded ones; DDP: views into its reduction buckets, one copy)
  optimizer  AdamW: 2 fp32 states, RMSprop: 1 (sharded under FSDP2)
  working    bf16 weights in use: FSDP2's gathered blocks (two: one computing, one prefetched) and its
             root (embeddings, head), plus one block's fp32 reduce-scatter buffer; under autocast (one
             process, DDP) the bf16 copies of all weights autocast keeps for the forward and backward
  activations what backward keeps: every block's input with --grad_checkpointing (plus one block
             recomputed), else every block's intermediates
  logits     bf16 logits of every position (an upper bound: only answer positions are computed) plus
             the fp32 log-softmax chunk, in both of IFT's passes
  step       what opt.step() allocates beyond the states, for the implementation train.py picks
             (optimizer_impl): none for fused AdamW, a few copies of the largest tensor per-tensor, and
             whole-model fp32 copies for torch's own CUDA default, the multi-tensor (foreach) step
  reference  the frozen reference of --ref=online and on-policy DPO/IPO/KTO: an fp32 copy of the model
             (FSDP2: its shard, plus its root, which FSDP2 keeps gathered after a no-grad forward)
The sum is a bound on both peaks of a step: backward's (activations) and opt.step()'s (step), which do
not coexist; tests/test_memplan.py measures how close it comes on CPU.
"""
import resource

import torch

GiB = 2**30
# Dense bf16 peaks of the SXM parts; a device not listed (PCIe/NVL variants, others) gets no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def block_params(a) -> int:
    kv = a.n_kv_heads * a.head_dim
    return a.dim * (a.n_heads * a.head_dim * 2 + 2 * kv) + 3 * a.dim * a.hidden_dim + 2 * a.dim


def n_params(a) -> int:
    return a.n_layers * block_params(a) + a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2) + a.dim


def weight_shapes(a) -> list:
    """(rows, columns) of every weight: dim 0 is the one FSDP2 shards."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    block = [(q, a.dim), (kv, a.dim), (kv, a.dim), (a.dim, q), (a.hidden_dim, a.dim), (a.hidden_dim, a.dim),
             (a.dim, a.hidden_dim), (a.dim, 1), (a.dim, 1)]
    return block + [(a.vocab_size, a.dim)] * (1 if a.tie_word_embeddings else 2) + [(a.dim, 1)]


def optimizer_impl(optimizer: str, device_type: str) -> str:
    """The optimizer step train.py runs, chosen for memory. torch.optim's default on CUDA is the multi-tensor
    ("foreach") step, whose _foreach_sqrt of the second moment allocates an fp32 copy of every parameter at
    once (RMSprop with weight decay a second one, for grad + decay): at 7B 27 GiB on top of the states, the
    difference between fitting one H200 and not. Fused AdamW updates in place, in one kernel per tensor
    group, also on FSDP2's DTensor shards; RMSprop has no fused kernel, so it (and AdamW off CUDA, where
    the per-tensor step is torch's own default) runs one tensor at a time, holding only that tensor's
    temporaries."""
    return "fused" if optimizer == "adamw" and device_type == "cuda" else "per_tensor"


def step_temporaries(a, optimizer: str, impl: str, shard: int, weight_decay: float) -> int:
    """Bytes opt.step() allocates beyond the states (torch.optim's AdamW / RMSprop, no momentum, not
    centered). foreach: sqrt(second moment) of every tensor at once, and for RMSprop with weight decay
    grad + decay too. Per-tensor: those of one tensor (AdamW: the sqrt and its quotient) while the previous
    tensor's denominator is still referenced, so counted as copies of the largest tensor (its shard under
    FSDP2). Fused AdamW: nothing."""
    decayed_grad = optimizer == "rmsprop" and weight_decay != 0
    if impl == "fused":
        return 0
    if impl == "foreach":
        return 4 * n_params(a) // shard * (1 + decayed_grad)
    largest = max(-(-rows // shard) * cols for rows, cols in weight_shapes(a))
    return 4 * largest * ((3 if optimizer == "adamw" else 2) + decayed_grad)


def plan(a, world: int, parallel: str, micro_batch_size: int, seq_len: int, optimizer: str = "adamw",
         bf16: bool = True, grad_checkpointing: bool = False, loss: str = "sft", impl: str = "",
         weight_decay: float = 0.0, reference: bool = False) -> dict:
    """{term: GiB per GPU, ..., "total"}; parallel: "single", "ddp" or "fsdp"; impl: the optimizer step,
    "fused", "foreach" or "per_tensor" ("" = what train.py picks on CUDA); reference: a frozen reference
    model is kept (reference.needs_model)."""
    n, shard = n_params(a), (world if parallel == "fsdp" else 1)
    act_bytes = 2 if bf16 else 4
    root = a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2)
    p = {"params": 4 * n / shard,
         "grads": 4 * n / shard,
         "optimizer": (8 if optimizer == "adamw" else 4) * n / shard}
    if parallel == "fsdp":
        p["working"] = act_bytes * (2 * block_params(a) + root) + 4 * block_params(a)
    else:
        p["working"] = 2 * n if bf16 else 0
    tokens = micro_batch_size * seq_len
    kv = a.n_kv_heads * a.head_dim
    # saved per token and block: matmul inputs/outputs (q, k, v, attention out, gate, up, act, product)
    # in the compute dtype, the two RMSNorms' fp32 inputs
    per_block = act_bytes * (4 * a.dim + 2 * kv + 4 * a.hidden_dim) + 2 * 4 * a.dim
    if grad_checkpointing:
        p["activations"] = tokens * (a.n_layers * 4 * a.dim + per_block)
    else:
        p["activations"] = tokens * a.n_layers * per_block
    pairs = 2 if loss in ("dpo", "ipo", "orpo", "simpo", "kto") else 1       # chosen + rejected rows
    p["activations"] *= pairs
    passes = 2 if loss == "ift" else 1
    chunk = min(4096, pairs * tokens)                                       # ift.label_logps' rows
    p["logits"] = (pairs * tokens * a.vocab_size * act_bytes + chunk * a.vocab_size * 4 * 2) * passes
    p["step"] = step_temporaries(a, optimizer, impl or optimizer_impl(optimizer, "cuda"), shard, weight_decay)
    p["reference"] = (4 * n / shard + (act_bytes * root if parallel == "fsdp" else 0)) if reference else 0
    p = {k: v / GiB for k, v in p.items()}
    p["total"] = sum(p.values())
    return p


def format_plan(p: dict) -> str:
    return "memory plan per GPU (estimate): " + " | ".join(f"{k} {v:.1f}" for k, v in p.items()) + " GiB"


def fsdp_world_that_fits(a, gpu_gib: float, **kw):
    """The fewest FSDP2 ranks (up to 64) whose plan fits in gpu_gib, or None."""
    for w in range(2, 65):
        if plan(a, w, "fsdp", **kw)["total"] <= gpu_gib:
            return w
    return None


def does_not_fit(p: dict, gpu_gib: float, a, world: int, parallel: str, **kw):
    """None if the plan fits in 95% of the GPU, else a one-line refusal saying what would fit."""
    if p["total"] <= 0.95 * gpu_gib:
        return None
    tips = []
    ckpt = {**kw, "grad_checkpointing": True}
    if not kw.get("grad_checkpointing") and plan(a, world, parallel, **ckpt)["total"] <= 0.95 * gpu_gib:
        tips.append("--grad_checkpointing=true")
    w = fsdp_world_that_fits(a, 0.95 * gpu_gib, **ckpt)
    if w is not None:
        tips.append(f"FSDP2 on >= {w} GPUs (torchrun --nproc_per_node={w} ... --parallel=fsdp "
                    "--grad_checkpointing=true)")
    small = {**kw, "micro_batch_size": 1, "grad_checkpointing": True}
    if kw.get("micro_batch_size", 1) > 1 and plan(a, world, parallel, **small)["total"] <= 0.95 * gpu_gib:
        tips.append("a smaller --micro_batch_size with a larger --grad_accum")
    mode = {"single": "one process", "ddp": "DDP (a full model, gradients and optimizer per GPU)",
            "fsdp": "FSDP2"}[parallel]
    return (f"does not fit: {mode} needs ~{p['total']:.0f} GiB per GPU ({format_plan(p)}), the GPU has "
            f"{gpu_gib:.0f} GiB, of which a plan may use 95%; try "
            + (" or ".join(tips) if tips else "more GPUs with FSDP2"))


def peak_flops(device, bf16: bool):
    """The device's dense bf16 peak (FLOP/s) from the table, or None (CPU, fp32, an unlisted device)."""
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:
        return None
    return next((f for k, f in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model, seq_len: int, cfg) -> float:
    """Training FLOPs per real token: forward + backward (model.flops_per_token) plus the no-grad forwards
    the objective adds (a third each): IFT's prediction pass, an online reference. Recomputation by
    activation checkpointing is not useful work and is not counted."""
    f = model.flops_per_token(seq_len)
    extra = (cfg.loss == "ift" and cfg.lam > 0) + (cfg.loss in ("dpo", "ipo", "kto") and cfg.ref == "online")
    return f * (1 + extra / 3)


def mfu(flops_token: float, tokens: int, seconds: float, peak, world: int):
    """Model FLOPs utilisation over an interval (tokens summed over ranks), or None without a peak."""
    return flops_token * tokens / seconds / (peak * world) if peak and seconds > 0 else None


def load_report(seconds: float, device, sharded: bool) -> str:
    """One line on the model load: its time and peak memory (GPU allocator on CUDA, else host RSS). The
    CUDA peak counter is reset afterwards, so the training peak (metrics' mem_gb) is the loop's own."""
    how = "sharded, each rank its part" if sharded else "whole model per rank"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GiB
        torch.cuda.reset_peak_memory_stats(device)
        return f"model load ({how}): {seconds:.1f} s, peak GPU memory {peak:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux
    return f"model load ({how}): {seconds:.1f} s, peak host RSS {rss:.2f} GiB"


def main():
    """The "what fits where" table of docs/SCALE.md for Mistral-7B (python -m infra.memplan)."""
    from model import ModelArgs
    m7b = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32000)
    print(f"Mistral-7B: {n_params(m7b) / 1e9:.2f} B parameters; micro-batch 8 x 1024, bf16 compute; the optimizer "
          "step train.py runs on CUDA (fused AdamW, per-tensor RMSprop); last column: the total with torch's "
          "default CUDA step (foreach) instead")
    # what the devices report: H100 80 GB 79.6 GiB, H200 141 GB 139.8 GiB
    rows = [("8x80 GB, FSDP2", 8, "fsdp", 79.6), ("1x141 GB, one process", 1, "single", 139.8),
            ("1x80 GB, one process", 1, "single", 79.6), ("8x80 GB, DDP", 8, "ddp", 79.6)]
    runs = [("ift", opt, ckpt) for opt in ("rmsprop", "adamw") for ckpt in (True, False)]
    runs += [("dpo online", opt, True) for opt in ("rmsprop", "adamw")]
    keys = ["params", "grads", "optimizer", "step", "reference", "working", "activations", "logits", "total"]
    print("| GPUs | loss | optimizer | grad ckpt | " + " | ".join(keys) + " | fits | total, foreach step |")
    print("|---|---|---|---|" + "---|" * len(keys) + "---|---|")
    for label, world, par, gpu in rows:
        for loss, opt, ckpt in runs:
            kw = dict(micro_batch_size=8, seq_len=1024, optimizer=opt, bf16=True, grad_checkpointing=ckpt,
                      loss=loss.split()[0], reference=loss == "dpo online")
            p = plan(m7b, world, par, **kw)
            why = does_not_fit(p, gpu, m7b, world, par, **kw)
            foreach = plan(m7b, world, par, **{**kw, "impl": "foreach"})["total"]
            print(f"| {label} | {loss} | {opt} | {'on' if ckpt else 'off'} | "
                  + " | ".join(f"{p[k]:.1f}" for k in keys) + f" | {'yes' if why is None else 'no'} | {foreach:.1f} |")


if __name__ == "__main__":
    from infra import flags
    flags.Parser(description=main.__doc__).parse_args()     # --help says what this prints; no options
    main()
