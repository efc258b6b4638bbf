"""
The GPU benchmark: one command, one process tree, every GPU claim of the project measured in one run
(planned for <= 7 minutes on one H200, start-up included), so scarce GPU minutes go to measuring.

  python bench.py --gpu                      # all sections; writes out/bench_gpu.json, prints markdown tables
  python bench.py --gpu --budget_s=300       # the same plan squeezed into 300 s: sections truncated or skipped
  python bench.py --gpu --tiny               # every section on CPU with tiny shapes (< 1 min; the test runs it)
  python bench.py --gpu --only=parity,train  # a subset (env always runs: the ratios need its ceilings)
  python -m benchmarks.gpu ...              # the same

Sections, in this order (each timed; a failure is recorded with its error and the run goes on):
  env       versions, device, free memory, measured bf16 matmul TFLOP/s and device copy GB/s (the ceilings)
  parity    tiny random model on the device (fp32, bf16) vs CPU fp32: logits, one SFT and one IFT step,
            greedy generate tokens; tolerances stated in the output
  train     largest Llama/Mistral-shaped random model that fits, fp32 master weights, the 7B recipe's
            optimizer built by train.make_optimizer and train.py's step (clip, step, zero_grad):
            sft, ift, dpo (precomputed reference), activation checkpointing on and off, in one process
            with bf16 autocast (train.py without torchrun); then ift under FSDP2 (parallel.wrap, in a
            process group of one: what torchrun --nproc_per_node=1 train.py --parallel=fsdp runs per rank)
  torchrun  train.py under torchrun --nproc_per_node=1, --parallel=fsdp and ddp, every objective (offline and
            on-policy), tiny model, a few steps each: pass/fail per run
  generate  7B-shaped random model in bf16: decode tok/s at batch 1 and 16 (eager, and compiled when
            compiled) vs the bandwidth bound; prefill tok/s
  eval      eval_gen.generate_all over 1,172 ARC-length random prompts, <= 100 new tokens: the first batch
            (compile + warm-up) apart from the steady batches, and the steady time of all 1,172 prompts

The time plan (--budget_s, default 400 s: with Python and CUDA start-up and the final tables, <= 7 minutes).
Each section has a share of the budget (PLAN; seconds of the default in brackets; the per-step times below
are estimates, not yet measured on a GPU); a section may use what
earlier sections left over, but not what the later ones are planned to need: it ends by the budget minus
the later sections' shares. Every section checks its own end before it starts and before each long step
(a configuration, a torchrun run, a compile, a batch); what would not fit is recorded 'skipped' with the
reason, and a section cut short keeps what it measured (status 'skipped', reason 'budget ...').
  env       [15 s]  GEMMs at 3 sizes and one copy, ~10 s on an H200
  parity    [15 s]  a tiny model, seconds
  train     [80 s]  7B random init ~5 s; per configuration ~10 s (a warm-up step, 3 timed steps); six
                    single-process ones and one FSDP2 one: the ones left when time runs out are skipped
  torchrun  [80 s]  20 tiny train.py runs, 8 at a time, ~20 s each (process + CUDA start-up)
  generate  [110 s] eager B=1, 16 (~10 s each); compiled B=1, 16: the first call compiles and records the
                    CUDA graphs (~30-60 s each), started only with 60 s left; prefill ~2 s
  eval      [90 s]  compiled (when 60 s are left, else eager): the first batch compiles, then ~1 s per
                    batch of 64 x 100 tokens; a cut-off run reports the steady rate it measured
Only torch/numpy/safetensors/sentencepiece/tqdm and this repository's modules: nothing is installed or
downloaded. Random weights everywhere (speed and memory do not depend on the values).
"""
import argparse
import concurrent.futures
import copy
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import unittest.mock
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

import ift
from generate import generate
from infra import atomic, flags
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_H200_BF16_PEAK = 989e12    # dense bf16 tensor-core peak of an H100/H200 SXM (the usual MFU denominator)
GiB = 2 ** 30


@dataclass
class Run:
    device: torch.device
    tiny: bool
    budget_s: float
    jobs: int
    seq_len: int
    eval_batch: int
    t0: float = field(default_factory=time.perf_counter)
    env: dict = field(default_factory=dict)       # measured ceilings, for the ratios of later sections
    shared: dict = field(default_factory=dict)    # the 7B-shaped bf16 model, built once for generate + eval
    reserved_s: float = 0.0                       # planned for the sections after the running one

    def elapsed(self):
        return time.perf_counter() - self.t0

    def left(self):
        """Seconds the running section has left: the budget minus what the later sections are planned for."""
        return self.budget_s - self.reserved_s - self.elapsed()

    @property
    def cuda(self):
        return self.device.type == "cuda"


class Skipped(Exception):
    """Raised inside a section that ran out of budget part-way; its partial results are kept."""
    def __init__(self, reason, results=None):
        super().__init__(reason)
        self.results = results or {}


def log(r, msg):
    print(f"[bench_gpu {r.elapsed():6.1f}s] {msg}", flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, warmup=1, reps=3):
    """Median wall seconds of fn() (device synchronised before and after each call)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def autocast(dev, on=True):
    return torch.autocast(dev.type, dtype=torch.bfloat16) if on else nullcontext()


def free_bytes(dev):
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def release(r):
    gc.collect()
    if r.cuda:
        torch.cuda.empty_cache()


def random_model(a: ModelArgs, dev, dtype=torch.float32, std=0.02, seed=0) -> Transformer:
    """Built on the meta device and filled on `dev`: a 7B shape takes seconds, not a CPU randn of 7B floats."""
    with torch.device("meta"):
        m = Transformer(a)
    m = m.to_empty(device=dev).to(dtype)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0) if name.endswith("layernorm.weight") or name == "norm.weight" else p.normal_(0.0, std)
    return m


def _n(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def count_params(a: ModelArgs) -> int:
    per_layer = 2 * a.dim * a.n_heads * a.head_dim + 2 * a.dim * a.n_kv_heads * a.head_dim \
        + 3 * a.dim * a.hidden_dim + 2 * a.dim
    return a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2) + a.n_layers * per_layer + a.dim


# ============================================================================ 1. environment
def _matmul_tflops(n, dtype, dev):
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    t = timeit(lambda: a @ b, dev, warmup=2, reps=10)
    return 2 * n ** 3 / t / 1e12


def _copy_gb_s(nbytes, dev):
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), dev, warmup=2, reps=10)
    return 2 * nbytes / t / 1e9        # bytes read + bytes written


def sec_env(r):
    d = r.device
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(d), "cpu_count": os.cpu_count(), "free_gib": free_bytes(d) / GiB}
    if r.cuda:
        p = torch.cuda.get_device_properties(d)
        try:
            from torch.cuda import nccl as _nccl
            nccl = _nccl.version()
        except Exception as e:      # recorded, not fatal: the torchrun section tests NCCL for real
            nccl = f"unknown ({type(e).__name__})"
        out.update(name=p.name, capability=f"{p.major}.{p.minor}", total_gib=p.total_memory / GiB,
                   cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
        sizes, dtype, nbytes = ((1024, 2048) if r.tiny else (4096, 8192, 16384)), torch.bfloat16, \
            (64 << 20 if r.tiny else 2 * GiB)
    else:    # CPU: fp32 GEMM and memcpy, the ceilings the tiny run's ratios are taken against
        out["name"] = platform.processor() or platform.machine()
        sizes, dtype, nbytes = (256, 512), torch.float32, 64 << 20
    out["matmul_dtype"] = str(dtype).removeprefix("torch.")
    measured = {}
    for n in sizes:             # smallest first: a short budget still gets a (lower) ceiling
        if measured and r.left() <= 0:
            break
        measured[n] = _matmul_tflops(n, dtype, d)
    out["matmul_tflops"] = max(measured.values())
    out["matmul_sizes"] = list(measured)
    out["copy_gb_s"] = _copy_gb_s(nbytes, d)
    out["headline"] = (f"{out.get('name')}, torch {out['torch']}, {out['free_gib']:.0f} GiB free; "
                       f"{out['matmul_dtype']} matmul {out['matmul_tflops']:.3g} TFLOP/s, copy {out['copy_gb_s']:.0f} GB/s")
    r.env.update(out)
    return out


# ============================================================================ 2. parity
# Relative tolerances (max |device - cpu| / max |cpu|). fp32: the device must agree to rounding (TF32 is off
# for fp32 matmuls by default). bf16 (autocast, fp32 weights; generate: bf16 weights): 8 mantissa bits,
# about 0.4 % per op, compounded over a few layers.
PARITY_TOL = {"fp32": {"logits": 1e-4, "loss": 1e-5, "grad": 1e-3},
              "bf16": {"logits": 5e-2, "loss": 5e-3, "grad": 1e-1}}


def parity_args(vocab=256):
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=vocab,
                     sliding_window=None, max_position_embeddings=256)


def _rel(x, ref):
    return float((x.float().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _sgd_step(base, batch, loss_fn, dev, bf16):
    """(loss, weight delta) of one SGD step with lr 1 (the delta is minus the gradient, all parameters)."""
    m = copy.deepcopy(base).to(dev).train()
    b = {k: v.to(dev) for k, v in batch.items()}
    with autocast(dev, bf16):
        loss = loss_fn(m, b)[0]
    loss.backward()
    loss = float(loss.detach())
    w0 = [p.detach().clone() for p in m.parameters()]
    torch.optim.SGD(m.parameters(), lr=1.0).step()
    delta = torch.cat([(p.detach() - q).float().reshape(-1).cpu() for p, q in zip(m.parameters(), w0)])
    return loss, delta


def _top2_margin(logits):
    top2 = logits.float().topk(2, -1).values
    return top2[..., 0] - top2[..., 1]


def _near_ties_only(diff_at, margin, tie):
    """True when every position where the device chose another token is a near-tie of the reference:
    its top-2 margin is within `tie` (twice the mode's own max logit error), where greedy choices may flip."""
    return all(float(margin[i]) <= tie for i in diff_at)


def sec_parity(r):
    dev, V, lam = r.device, 256, 0.2
    base = Transformer(parity_args(V)).init_weights(std=0.2, seed=0)   # std 0.2: peaked logits, few near-ties
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, V, (4, 48), generator=g)
    labels = x.clone()
    labels[:, :16] = -100                                                # a 16-token prompt, then the answer
    batch = {"input_ids": x, "labels": labels}
    sup = labels[:, 1:] != -100
    prompts = torch.randint(3, V, (2, 12), generator=g).tolist()
    n_new = 16
    with torch.no_grad():
        base.eval()
        ref_logits = base(x)
        ref_pass1 = base(x, select=ift._select(sup))                     # IFT's first pass (greedy guesses)
    mix = x.clone()
    mix[:, 1:][sup] = ref_pass1.argmax(-1)

    def ift_pass2(m, b):
        """IFT's second pass + weights with the CPU fp32 guesses: the numerics without the discrete argmax."""
        lp, mm = ift.token_logps(m, b, mix_ids=b["mix"], mix_lambda=lam)
        return ift.ift_objective(lp, mm)
    objectives = {"sft": lambda m, b: ift.sft_loss(m, b), "ift": lambda m, b: ift.ift_loss(m, b, lam=lam),
                  "ift_pass2": ift_pass2}
    cpu = torch.device("cpu")
    ref_steps = {k: _sgd_step(base, {**batch, "mix": mix}, f, cpu, False) for k, f in objectives.items()}
    ref_tokens = generate(base.eval(), prompts, n_new, stop_ids=[])
    full = torch.tensor([p + t for p, t in zip(prompts, ref_tokens)])
    with torch.no_grad():   # the reference's logits at every generated position (for near-ties)
        gen_logits = base(full)[:, len(prompts[0]) - 1:-1]
    out = {"tolerances_rel": PARITY_TOL, "device": str(dev),
           "measures": "logits, grad: max|device - cpu| / max|cpu| (grad = minus the weight delta of one SGD step, "
                       "lr 1, all parameters); loss: |device - cpu| / |cpu|; IFT grad with the CPU fp32 guesses "
                       "(pass 1's argmax may flip at near-ties, checked apart); greedy tokens: identical up to a "
                       "near-tie of the reference"}
    failures = []
    for mode in ("fp32", "bf16"):
        if r.left() <= 0:
            out["failures"] = failures
            raise Skipped(f"budget: ran out before the {mode} mode", out)
        tol, bf16, res = PARITY_TOL[mode], mode == "bf16", {}
        m = copy.deepcopy(base).to(dev).eval()
        with torch.no_grad(), autocast(dev, bf16):
            res["logits_rel"] = _rel(m(x.to(dev)), ref_logits)
            p1 = m(x.to(dev), select=ift._select(sup.to(dev))).float().cpu()
        res["logits_ok"] = res["logits_rel"] <= tol["logits"]
        flips = (p1.argmax(-1) != ref_pass1.argmax(-1)).nonzero().flatten().tolist()
        res["ift_guess_flips"] = len(flips)
        res["ift_guesses_ok"] = _near_ties_only(flips, _top2_margin(ref_pass1),
                                                2 * float((p1 - ref_pass1).abs().max()))
        steps = {k: _sgd_step(base, {**batch, "mix": mix}, f, dev, bf16) for k, f in objectives.items()}
        for k, (loss, delta) in steps.items():
            res[f"{k}_loss_rel"] = abs(loss - ref_steps[k][0]) / abs(ref_steps[k][0])
            res[f"{k}_grad_rel"] = _rel(delta, ref_steps[k][1])
        res["sft_ok"] = res["sft_loss_rel"] <= tol["loss"] and res["sft_grad_rel"] <= tol["grad"]
        res["ift_ok"] = res["ift_loss_rel"] <= tol["loss"] and res["ift_pass2_loss_rel"] <= tol["loss"] \
            and res["ift_pass2_grad_rel"] <= tol["grad"] and res["ift_guesses_ok"]
        # generate: fp32 weights, or bf16 weights (what the generation section runs)
        gm = m.to(torch.bfloat16) if bf16 else m
        toks = generate(gm, prompts, n_new, stop_ids=[])
        with torch.no_grad():
            tie = 2 * float((gm(full.to(dev))[:, len(prompts[0]) - 1:-1].float().cpu() - gen_logits).abs().max())
        first = [next((j for j, (a, b) in enumerate(zip(t, rt)) if a != b), None) for t, rt in zip(toks, ref_tokens)]
        margin = _top2_margin(gen_logits)
        res["generate_first_divergence"] = first
        res["generate_ok"] = all(j is None or float(margin[b, j]) <= tie for b, j in enumerate(first))
        res["tie_threshold"] = tie
        for k in ("logits_ok", "sft_ok", "ift_ok", "generate_ok"):
            if not res[k]:
                failures.append(f"{mode} {k[:-3]} outside tolerance")
        out[mode] = res
        del m, gm
    out["failures"] = failures
    out["headline"] = (f"logits rel fp32 {out['fp32']['logits_rel']:.1e} / bf16 {out['bf16']['logits_rel']:.1e}; "
                       f"IFT grad rel fp32 {out['fp32']['ift_pass2_grad_rel']:.1e} / bf16 "
                       f"{out['bf16']['ift_pass2_grad_rel']:.1e}; "
                       + ("all within tolerance" if not failures else "; ".join(failures)))
    return out


# ============================================================================ 3. training
# Candidates, largest first. Mistral-7B is ModelArgs' default; the others are Llama-shaped fallbacks.
TRAIN_SHAPES = [("mistral-7b", {}),
                ("llama-3b", dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, hidden_dim=8192)),
                ("llama-1b", dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, hidden_dim=8192))]
TINY_SHAPE = ("tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512))
MEM_FRACTION = 0.9      # of free memory the estimate may use (allocator fragmentation, CUDA workspaces)


RECIPE = os.path.join(ROOT, "configs", "mistral7b_ift.json")   # the 7B recipes' optimizer and precision
OPT_STATE_BYTES = {"adamw": 8, "rmsprop": 4}
# (wrapping, objective, checkpointing), most wanted first: what is left when the time runs out is skipped.
# FSDP2 last: it shards the model in place.
TRAIN_CONFIGS = [("single", o, True) for o in ("sft", "ift", "dpo")] + \
    [("single", o, False) for o in ("sft", "ift", "dpo")] + [("fsdp", "ift", True)]


def optimizer_impl(opt, device):
    """fused | foreach | per-tensor: the step implementation torch will run (foreach unset: its default,
    multi-tensor on CUDA)."""
    d = opt.defaults
    if d.get("fused"):
        return "fused"
    return "foreach" if (device.type == "cuda" if d.get("foreach") is None else d["foreach"]) else "per-tensor"


def step_temp_bytes(opt, device):
    """Bytes per parameter the optimizer step allocates beyond its state: the multi-tensor (foreach) one
    makes parameter-sized fp32 temporaries (~4 bytes per parameter, measured on CPU with foreach forced);
    the fused and the per-tensor ones at most one tensor's worth (ignored here)."""
    return 4 if optimizer_impl(opt, device) == "foreach" else 0


def optimizer_name(opt, device):
    return f"{type(opt).__name__} ({optimizer_impl(opt, device)}), weight_decay {opt.defaults.get('weight_decay')}"


def train_memory(a: ModelArgs, rows, T, ckpt, per_param=14):
    """Bytes: per parameter fp32 weights + fp32 grads + optimizer state + the bf16 weight copies autocast
    keeps for backward (2) + the step's temporaries: `per_param` (RMSprop per-tensor: 4+4+4+2 = 14) +
    activations. Activations (bf16 compute, fp32 residual stream), measured with saved-tensor hooks on a
    Mistral-proportioned model: ~67·dim bytes per token per layer without checkpointing (80 here, for
    backward's transients); with it each layer keeps its fp32 input (4·dim) and one layer at a time is
    recomputed. Plus the final norm (16·dim), the answer-position logits (bf16 + fp32) and one fp32
    log-softmax chunk of 4096 rows. FSDP2 at one rank holds the same minus autocast's copies plus two
    gathered bf16 blocks: this estimate covers it too."""
    tok = rows * T
    act = a.n_layers * tok * a.dim * (4 if ckpt else 80) + tok * a.dim * ((80 if ckpt else 0) + 16)
    return per_param * count_params(a) + act + tok * a.vocab_size * 8 + 4096 * a.vocab_size * 4


def _train_batch(rows, T, V, dev, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (rows, T), generator=g)
    labels = ids.clone()
    labels[:, :T // 4] = -100                  # a prompt of a quarter of the sequence, the rest supervised
    return {"input_ids": ids.to(dev), "labels": labels.to(dev)}


def _measure_train(r, model, opt, ctx, grad_clip, obj, rows, T):
    """train.py's step on one micro-batch: forward + backward in ctx, clip, optimizer step, zero_grad."""
    dev, a = r.device, model.args
    batch = _train_batch(rows, T, a.vocab_size, dev, 1)
    if obj == "dpo":      # rows = chosen half + rejected half; reference log-probs precomputed (random here)
        ref = -torch.rand(rows, device=dev) * T * math.log(a.vocab_size)

        def loss_fn():
            s, _ = ift.seq_logps(model, batch)
            return ift.dpo_loss(s[:rows // 2], s[rows // 2:], ref[:rows // 2], ref[rows // 2:])[0]
    elif obj == "ift":
        def loss_fn():
            return ift.ift_loss(model, batch)[0]
    else:
        def loss_fn():
            return ift.sft_loss(model, batch)[0]

    def fwd_bwd():
        with ctx:
            loss = loss_fn()
            loss.backward()
        return loss

    def opt_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    if r.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t = time.perf_counter()
    fwd_bwd(), opt_step()                     # warm-up: allocator growth, kernel selection, FSDP2's lazy init
    sync(dev)
    first = time.perf_counter() - t
    t_fb, t_opt = [], []
    for _ in range(1 if r.tiny else 3):
        if t_fb and r.left() <= 0:            # out of time: keep the steps measured so far
            break
        sync(dev)
        t = time.perf_counter()
        loss = fwd_bwd()
        sync(dev)
        t1 = time.perf_counter()
        opt_step()
        sync(dev)
        t_fb.append(t1 - t)
        t_opt.append(time.perf_counter() - t1)
    fb, op = statistics.median(t_fb), statistics.median(t_opt)
    tok_s = rows * T / (fb + op)
    flops = model.flops_per_token(T) * tok_s            # model FLOPs/s on the 6N(+attention) convention
    # Hardware FLOPs also count IFT's no-grad first pass and checkpointing's recomputed forward (+1/3 each).
    hw = flops * (1 + (obj == "ift") / 3 + model.grad_checkpointing / 3)
    ceiling = r.env.get("matmul_tflops")            # absent only when the env section itself failed
    return {"loss": float(loss.detach()), "first_step_s": first, "timed_steps": len(t_fb), "fwd_bwd_s": fb,
            "opt_s": op, "step_s": fb + op, "tok_s": tok_s,
            "model_tflops": flops / 1e12, "mfu_vs_measured": flops / (ceiling * 1e12) if ceiling else None,
            "mfu_vs_989": flops / H100_H200_BF16_PEAK if r.cuda else None,
            "hfu_vs_989": hw / H100_H200_BF16_PEAK if r.cuda else None,
            "peak_gib": torch.cuda.max_memory_allocated(dev) / GiB if r.cuda else None}


def _measure_halving(r, run, model, opt, ctx, grad_clip, rows, min_rows, T, estimate):
    """Measure run's configuration at `rows`; out of memory: record it and halve, down to min_rows."""
    while "status" not in run:
        run.update(rows=rows, tokens_per_step=rows * T, estimate_gib=estimate(rows) / GiB)
        oom = None
        try:
            run.update(_measure_train(r, model, opt, ctx, grad_clip, run["objective"], rows, T), status="ok")
        except Exception as e:
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e):
                run.update(status="failed", error=f"{type(e).__name__}: {e}")
            else:
                oom = f"OutOfMemoryError: {str(e).splitlines()[0]}"
        # Out of the except block: its traceback (and the step's activations) are gone now.
        opt.zero_grad(set_to_none=True)
        release(r)
        if oom:
            run.setdefault("oom_at_rows", []).append(rows)
            if rows <= min_rows:
                run.update(status="failed", error=f"{oom} (at {rows} rows)")
            rows //= 2


def _one_process_group(dev):
    """FSDP2 needs a process group: one of a single rank (in memory), as torchrun --nproc_per_node=1 gives
    train.py. True when this call made it (and so must destroy it)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


def sec_train(r):
    import torch.distributed as dist
    from infra import parallel
    import train
    dev, T = r.device, (64 if r.tiny else r.seq_len)
    cfg = train.parse_config([f"--config={RECIPE}"])
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and r.cuda)     # train.py's rule
    probe = train.make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1, device=dev))], dev)
    per_param = 4 + 4 + OPT_STATE_BYTES[cfg.optimizer] + 2 + step_temp_bytes(probe, dev)
    free = free_bytes(dev)
    shapes = [TINY_SHAPE] if r.tiny else TRAIN_SHAPES
    fits = lambda a, rows, ckpt: train_memory(a, rows, T, ckpt, per_param) <= MEM_FRACTION * free
    name, a = next(((n, ModelArgs(**kw)) for n, kw in shapes if fits(ModelArgs(**kw), 2, True)), (None, None))
    if a is None:
        raise RuntimeError(f"no training shape fits {free / GiB:.1f} GiB free (smallest needs "
                           f"{train_memory(ModelArgs(**shapes[-1][1]), 2, T, True, per_param) / GiB:.1f} GiB)")
    log(r, f"train: {name}, {_n(count_params(a))} params, seq {T}, {free / GiB:.1f} GiB free, "
           f"{optimizer_name(probe, dev)}")
    model = random_model(a, dev, torch.float32)
    out = {"shape": name, "params": count_params(a), "seq_len": T, "free_gib": free / GiB,
           "optimizer": optimizer_name(probe, dev) + ", built by train.make_optimizer",
           "recipe": os.path.relpath(RECIPE, ROOT), "bytes_per_param": per_param,
           "wrapping": "single: one process, fp32 master weights, bf16 autocast (train.py without torchrun); "
                       "fsdp: parallel.wrap FSDP2 in a process group of one (torchrun --nproc_per_node=1 "
                       "train.py --parallel=fsdp), bf16 compute by its MixedPrecisionPolicy",
           "mfu_convention": "model FLOPs = Transformer.flops_per_token (6 per weight + attention) x tokens/s; "
                             "hfu adds IFT's no-grad first pass and checkpoint recompute (+1/3 each)",
           "runs": [], "failures": []}
    need = 0 if r.tiny else 15                  # a 7B configuration: a warm-up step and 3 timed steps
    made_group, opt = False, None
    try:
        for wrapping, obj, ckpt in TRAIN_CONFIGS:
            fsdp = wrapping == "fsdp"
            cands = (2,) if r.tiny else (8, 4, 2) if obj == "dpo" else (8, 4, 2, 1)   # DPO: chosen + rejected
            rows = next((b for b in cands if fits(a, b, ckpt)), None)
            run = {"parallel": wrapping, "objective": obj, "grad_checkpointing": ckpt}
            out["runs"].append(run)
            if rows is None:
                run.update(status="skipped", reason=f"estimate {train_memory(a, cands[-1], T, ckpt, per_param) / GiB:.0f}"
                                                    f" GiB for {cands[-1]} rows > {MEM_FRACTION:.0%} of {free / GiB:.0f} GiB free")
                continue
            if r.left() < need:
                run.update(status="skipped", reason=f"budget ({r.left():.0f} s left, {need} s needed)")
                continue
            model.set_activation_checkpointing(ckpt)
            try:
                if fsdp:       # as train.py: wrap, then build the optimizer on the sharded parameters
                    opt = None
                    release(r)
                    made_group = _one_process_group(dev)
                    model = parallel.wrap(model, "fsdp", dev, bf16, True)
                if opt is None:
                    opt = train.make_optimizer(cfg, model.parameters() if fsdp else
                                               [p for p in model.parameters() if p.requires_grad], dev)
            except Exception as e:
                run.update(status="failed", error=f"setting up: {type(e).__name__}: {e}")
                out["failures"].append(f"{wrapping} {obj} ckpt={ckpt}: {type(e).__name__} setting up")
                continue
            ctx = autocast(dev) if bf16 and not fsdp else nullcontext()     # train.py's rule
            _measure_halving(r, run, model, opt, ctx, cfg.grad_clip, rows, cands[-1], T,
                             lambda rows: train_memory(a, rows, T, ckpt, per_param))
            if run["status"] == "failed":
                out["failures"].append(f"{wrapping} {obj} ckpt={ckpt}: {run['error'].split(':')[0]}")
            if run["status"] == "ok":
                log(r, f"train {wrapping} {obj} ckpt={ckpt} rows={run['rows']}: {run['step_s'] * 1e3:.0f} ms/step, "
                       f"{run['tok_s']:.0f} tok/s" + (f", MFU {run['mfu_vs_989']:.1%}, peak {run['peak_gib']:.1f} GiB"
                                                       if r.cuda else ""))
    finally:
        del model, opt
        release(r)
        if made_group:
            dist.destroy_process_group()
    out.update(_train_summary(out["runs"], f"{name} ({_n(count_params(a))}), seq {T}, {optimizer_name(probe, dev)}",
                              r.cuda))
    skipped = [f"{x['parallel']} {x['objective']} ckpt={x['grad_checkpointing']}" for x in out["runs"]
               if x["status"] == "skipped" and x["reason"].startswith("budget")]
    return _partial(out, skipped)


def _train_summary(runs, what, cuda):
    """ift_over_sft (single process, equal rows) and the headline."""
    ok = {(x["objective"], x["grad_checkpointing"]): x for x in runs if x.get("status") == "ok" and x["parallel"] == "single"}
    ratios = {f"ckpt={c}": {"step": ok[("ift", c)]["step_s"] / ok[("sft", c)]["step_s"],
                            "fwd_bwd": ok[("ift", c)]["fwd_bwd_s"] / ok[("sft", c)]["fwd_bwd_s"]}
              for c in (False, True) if ("ift", c) in ok and ("sft", c) in ok
              and ok[("ift", c)]["rows"] == ok[("sft", c)]["rows"]}
    best = max((x for x in runs if x.get("status") == "ok"), key=lambda x: x["tok_s"], default=None)
    headline = (f"{what}: best {best['parallel']} {best['objective']} ckpt={best['grad_checkpointing']} "
                f"{best['tok_s']:.0f} tok/s" + (f", MFU {best['mfu_vs_989']:.1%} of 989 TFLOP/s" if cuda else "")
                + "; ift/sft step " + ", ".join(f"{k} {v['step']:.2f}x" for k, v in ratios.items())
                ) if best else "no configuration ran"
    return {"ift_over_sft": ratios, "headline": headline}


# ============================================================================ 4. torchrun
OFFLINE = ("sft", "ift", "dpo", "ipo", "orpo", "simpo", "kto")
ONPOLICY = ("sft", "dpo", "reinforce")
# Tiny mode (CPU, gloo): a subset that still covers FSDP, DDP and on-policy sampling (~7 s per run on 2 cores,
# one at a time: two at once on 2 cores took longer than one after the other).
TINY_MATRIX = [("fsdp", "ift", False), ("ddp", "dpo", True)]
TORCHRUN_SHAPE = ["--dim=32", "--n_layers=2", "--n_heads=2", "--n_kv_heads=1", "--hidden_dim=64", "--n_train=64",
                  "--n_eval=8", "--gen_eval=0", "--progress=false", "--log_every=1", "--max_steps=2",
                  "--micro_batch_size=8", "--warmup_ratio=0"]
ONPOLICY_ARGS = ["--onpolicy_every=1", "--n_samples=2", "--max_new_tokens=8"]


def torchrun_matrix(tiny):
    if tiny:
        return TINY_MATRIX
    return [(par, loss, onp) for par in ("fsdp", "ddp")
            for loss, onp in [(l, False) for l in OFFLINE] + [(l, True) for l in ONPOLICY]]


def _worker_tail(err, n=2500):
    """The end of the worker's own output: torchrun's launcher appends ~1.5 kB of ChildFailedError
    boilerplate after the worker's traceback, which would push the real error out of a plain tail."""
    cut = err.find("torch/distributed/elastic/multiprocessing/api.py")
    if cut > 0:
        err = err[:err.rfind("\n", 0, cut) + 1]
    return err[-n:]


def _run_torchrun(cmd, env, timeout):
    """subprocess.run, but a timeout sends torchrun SIGTERM first: it then stops its workers (each in a
    session of its own), where a plain kill would orphan them, holding the GPU into the next section."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _torchrun_one(r, par, loss, onp, tok, work, timeout, cut_by_budget):
    out_dir = tempfile.mkdtemp(dir=work, prefix=f"{par}-{loss}-")
    args = TORCHRUN_SHAPE + [f"--tokenizer={tok}", f"--out_dir={out_dir}", f"--loss={loss}", f"--parallel={par}"] \
        + (ONPOLICY_ARGS if onp else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "train.py")] + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    rec = {"parallel": par, "loss": loss, "onpolicy": onp, "command": "torchrun " + " ".join(cmd[3:])}
    t = time.perf_counter()
    try:
        p = _run_torchrun(cmd, env, timeout)
        rec["seconds"] = time.perf_counter() - t
        summary = next((json.loads(l) for l in reversed(p.stdout.splitlines()) if l.startswith('{"final_train_loss"')),
                       None)
        ok = p.returncode == 0 and summary is not None and summary.get("final_train_loss") is not None \
            and math.isfinite(summary["final_train_loss"])
        rec.update(status="ok" if ok else "failed", returncode=p.returncode,
                   final_train_loss=summary and summary.get("final_train_loss"))
        if not ok:
            rec["stderr_tail"] = _worker_tail(p.stderr or p.stdout)
    except subprocess.TimeoutExpired as e:
        rec.update(seconds=time.perf_counter() - t, stderr_tail=_worker_tail(e.stderr or ""))
        rec.update(status="skipped", reason=f"budget: cut off after {timeout:.0f} s") if cut_by_budget else \
            rec.update(status="failed", error=f"timed out after {timeout:.0f} s")
    shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def sec_torchrun(r):
    import data, tokenizer
    work = tempfile.mkdtemp(prefix="bench_gpu_torchrun-")
    try:
        tok = os.path.join(work, "tok")    # one tokenizer for every run (each run would otherwise train its own)
        tokenizer.train_tokenizer(data.corpus_text(data.synthetic_task(300, 0) + data.synthetic_pairs(100, 1)), tok, 320)
        matrix, per_run = torchrun_matrix(r.tiny), (120 if r.tiny else 180)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        log(r, f"torchrun: {len(matrix)} runs ({backend}), {r.jobs} at a time")

        def one(spec):
            left = r.left()
            if left < (1 if r.tiny else 10):
                return {"parallel": spec[0], "loss": spec[1], "onpolicy": spec[2], "status": "skipped",
                        "reason": f"budget ({left:.0f} s left)"}
            rec = _torchrun_one(r, *spec, tok + ".model", work, min(per_run, left), left < per_run)
            log(r, f"torchrun {spec[0]} {spec[1]}{' on-policy' if spec[2] else ''}: {rec['status']} "
                   f"({rec.get('seconds', 0):.1f} s)")
            return rec
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, r.jobs)) as pool:
            runs = list(pool.map(one, matrix))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_ok = sum(x["status"] == "ok" for x in runs)
    what = lambda x: f"{x['parallel']} {x['loss']}{' on-policy' if x['onpolicy'] else ''}"
    failures = [f"{what(x)}: {x['status']}" for x in runs if x["status"] == "failed"]
    skipped = [what(x) for x in runs if x["status"] == "skipped"]
    out = {"backend": backend, "subset": "tiny-mode subset" if r.tiny else "full matrix", "runs": runs,
           "failures": failures, "headline": f"{n_ok}/{len(runs)} runs passed ({backend})"
           + ("; failed: " + ", ".join(failures) if failures else "")
           + ("; skipped (budget): " + ", ".join(skipped) if skipped else "")}
    return _partial(out, skipped)


def _partial(out, skipped):
    """A section's result: failed when something failed; else cut short (Skipped) when parts were skipped
    for the budget; else ok."""
    if skipped and not out.get("failures"):
        raise Skipped(f"budget: skipped {', '.join(skipped)}", out)
    return out


# ============================================================================ 5. generation
def gen_args(tiny):
    if tiny:
        return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512,
                         sliding_window=None, max_position_embeddings=512)
    return ModelArgs()      # Mistral-7B shape


def shared_model(r):
    """The 7B-shaped bf16 random model of sections 5 and 6 (built once)."""
    if "gen" not in r.shared:
        a = gen_args(r.tiny)
        log(r, f"building a {_n(count_params(a))}-parameter bf16 random model")
        r.shared["gen"] = random_model(a, r.device, torch.bfloat16).eval()
    return r.shared["gen"]


# A first compiled call (dynamo + inductor + CUDA-graph recording for one batch shape) on an H200: start one
# only with this much of the section's time left.
COMPILE_NEED_S = 60


def _compile_counts():
    """(dynamo graphs compiled, inductor's count of non-static inputs of recorded CUDA graphs: it grows with
    every CUDA-graph recording), to see whether the steady-state calls still compiled or re-recorded."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_recorded_non_static_inputs"]


def _steady_compiles(before):
    after = _compile_counts()
    return {"graphs_compiled_in_steady": after[0] - before[0], "cudagraph_recordings_in_steady": after[1] - before[1]}


def sec_generate(r):
    dev, model = r.device, shared_model(r)
    a = model.args
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    P, n_new = (16, 8) if r.tiny else (128, 64)
    g = torch.Generator().manual_seed(0)
    modes = [("eager", {}), ("compiled", {"compile": True})]
    out = {"params": model.num_params(), "weight_gib": wbytes / 2**30, "prompt_len": P, "new_tokens": n_new,
           "bound": "batch x copy GB/s / weight bytes (every decode step reads all weights once; KV cache ignored)",
           "timing": "first_call_s: the first call of a mode and batch (compile, CUDA-graph recording, warm-up); "
                     "decode: steady calls only, median of 2 x 64 tokens minus median of 3 x 1 token",
           "decode": [], "failures": []}
    if r.tiny:
        modes, out["compiled"] = modes[:1], "not measured in tiny mode (CPU compile time would dominate)"
    # The section ends by the budget minus eval's planned share (its compile included): a compile starts
    # only when it fits in this section's own time.
    for mode, kw in modes:
        for B in (1, 16):
            need = 0 if r.tiny else COMPILE_NEED_S if mode == "compiled" else 10
            if r.left() < max(need, 1e-9):
                out["decode"].append({"mode": mode, "batch": B, "status": "skipped",
                                      "reason": f"budget ({r.left():.0f} s left, {need} s needed)"})
                continue
            prompts = torch.randint(3, a.vocab_size, (B, P), generator=g).tolist()
            rec = {"mode": mode, "batch": B}
            try:
                sync(dev)
                t = time.perf_counter()
                generate(model, prompts, n_new, stop_ids=[], **kw)     # compile + recording + warm-up
                sync(dev)
                rec["first_call_s"] = time.perf_counter() - t
                before = _compile_counts()
                t1 = timeit(lambda: generate(model, prompts, 1, stop_ids=[], **kw), dev, warmup=0, reps=3)
                tn = timeit(lambda: generate(model, prompts, n_new, stop_ids=[], **kw), dev, warmup=0, reps=2)
                rec.update(_steady_compiles(before) if mode == "compiled" else {})
                tok_s = B * (n_new - 1) / (tn - t1)         # decode only: the prefill + first token subtracted
                bound = B * r.env["copy_gb_s"] * 1e9 / wbytes if r.env.get("copy_gb_s") else None
                rec.update(status="ok", steady_call_s=tn, decode_tok_s=tok_s, ms_per_step=(tn - t1) / (n_new - 1) * 1e3,
                           bound_tok_s=bound, fraction_of_bound=tok_s / bound if bound else None)
                log(r, f"generate {mode} B={B}: first call {rec['first_call_s']:.1f} s, then {tok_s:.0f} tok/s "
                       f"({_f(bound and tok_s / bound, '.0%')} of the bandwidth bound)")
            except Exception as e:
                rec.update(status="failed", error=f"{type(e).__name__}: {e}")
                out["failures"].append(f"decode {mode} B={B}: {type(e).__name__}")
            finally:
                if kw.get("compile"):
                    model.clear_cache()
            out["decode"].append(rec)
    B, Pl = (2, 64) if r.tiny else (4, 2048)
    if r.left() > 0:
        prompts = torch.randint(3, a.vocab_size, (B, Pl), generator=g).tolist()
        t = timeit(lambda: generate(model, prompts, 1, stop_ids=[]), dev, warmup=1, reps=3)
        out["prefill"] = {"batch": B, "prompt_len": Pl, "tok_s": B * Pl / t,
                          "tflops": 2 * model.num_params(exclude_embedding=True) * B * Pl / t / 1e12}
    best = {(d["mode"], d["batch"]): d for d in out["decode"] if d.get("status") == "ok"}
    out["headline"] = ", ".join(f"{m} B={b} {d['decode_tok_s']:.0f} tok/s ({_f(d['fraction_of_bound'], '.0%')} of bound; "
                                f"first call {d['first_call_s']:.1f} s)" for (m, b), d in best.items()) \
        + (f"; prefill {out['prefill']['tok_s']:.0f} tok/s" if "prefill" in out else "")
    skipped = [f"{d['mode']} B={d['batch']}" for d in out["decode"] if d["status"] == "skipped"] \
        + ([] if "prefill" in out else ["prefill"])
    return _partial(out, skipped)


# ============================================================================ 6. evaluation
class _OutOfTime(Exception):
    pass


class _TimedGenerate:
    """generate() as eval_gen.generate_all calls it, timing each call (one batch) and counting its new tokens;
    past the section's end it stops the run between batches."""

    def __init__(self, r):
        self.r, self.ends, self.rows, self.new_tokens = r, [], 0, 0

    def __call__(self, model, rows, *args, **kw):
        gens = generate(model, rows, *args, **kw)       # its .tolist() synchronises the device
        self.ends.append(time.perf_counter())
        self.rows, self.new_tokens = self.rows + len(rows), self.new_tokens + sum(len(x) for x in gens)
        if self.r.left() <= 0:
            raise _OutOfTime()
        return gens


def sec_eval(r):
    import eval_gen
    model = shared_model(r)
    a = model.args
    n_q, (lo, hi), max_new, bs = (24, (15, 25), 8, 8) if r.tiny else (1172, (150, 250), 100, r.eval_batch)
    rng = random.Random(0)     # ARC-Challenge test: 1,172 questions; its chat prompts are ~150-250 tokens
    prompts = [[a.bos_token_id] + [rng.randrange(3, a.vocab_size) for _ in range(rng.randint(lo, hi) - 1)]
               for _ in range(n_q)]
    if r.tiny:
        compiled, why = False, "tiny mode (CPU compile time would dominate)"
    elif r.left() < COMPILE_NEED_S:
        compiled, why = False, f"budget ({r.left():.0f} s left, {COMPILE_NEED_S} s needed for the compile)"
    else:
        compiled, why = True, "eval_gen --compile"
    timed = _TimedGenerate(r)
    t0 = time.perf_counter()
    try:   # one call, as eval_gen does: one cache (and CUDA graph) for the whole run
        with unittest.mock.patch.object(eval_gen, "generate", timed):
            eval_gen.generate_all(model, prompts, max_new, bs, [a.eos_token_id], compile=compiled)
    except _OutOfTime:
        model.clear_cache()
    ends, done = timed.ends, min(timed.rows, n_q)
    first = ends[0] - t0 if ends else None
    steady_s, steady_q = (ends[-1] - ends[0], done - bs) if len(ends) > 1 else (None, 0)
    qps = steady_q / steady_s if steady_s else None
    out = {"questions": done, "of": n_q, "prompt_len": [lo, hi], "max_new_tokens": max_new, "batch_size": bs,
           "compiled": compiled, "mode": why, "batches": len(ends), "wall_s": (ends[-1] - t0) if ends else None,
           "first_batch_s": first, "steady_s": steady_s, "steady_questions_per_s": qps,
           "all_questions_steady_s": n_q / qps if qps else None, "new_tokens": timed.new_tokens,
           "timing": "first_batch_s: the first batch of the run, compile and CUDA-graph recording included; "
                     "steady: the batches after it; all_questions_steady_s: all prompts at the steady rate (a "
                     "cut-off run measured the longest prompts first: an upper bound)",
           "note": "random weights almost never emit EOS, so every prompt decodes all new tokens: an upper bound "
                   "on a trained model's time (which stops after 'The best answer is X.')",
           "headline": (f"{done} prompts ({'compiled' if compiled else 'eager'}, batch {bs}): first batch "
                        f"{_f(first, '.1f')} s, then {_f(qps, '.1f')} q/s; all {n_q} at the steady rate "
                        f"{_f(qps and n_q / qps, '.1f')} s")}
    if done < n_q:
        raise Skipped(f"budget: ran out after {done} of {n_q} prompts", out)
    return out


# ============================================================================ driver
SECTIONS = [("env", sec_env), ("parity", sec_parity), ("train", sec_train), ("torchrun", sec_torchrun),
            ("generate", sec_generate), ("eval", sec_eval)]
# Each section's planned share of --budget_s (the module docstring gives the seconds of the default 400 s).
PLAN = {"env": 0.0375, "parity": 0.0375, "train": 0.2, "torchrun": 0.2, "generate": 0.275, "eval": 0.225}


def write_json(path, obj):
    """A run killed mid-write leaves the previous complete file (rewritten after every section)."""
    atomic.write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def run_sections(r, sections, report, save=lambda rep: None, only=None):
    """Run each section in order: timed, failures recorded (error + traceback tail) and the run goes on;
    a section has until the budget minus the PLAN shares of the selected sections after it, and one with
    no time left is recorded as skipped. `save` after every section."""
    selected = [name for name, _ in sections if only is None or name in only or name == "env"]
    for name, fn in sections:
        r.reserved_s = r.budget_s * sum(PLAN.get(n, 0.0) for n in selected[selected.index(name) + 1:]) \
            if name in selected else 0.0
        if name not in selected:
            rec = {"status": "skipped", "reason": "not selected (--only)"}
        elif r.left() <= 0:
            rec = {"status": "skipped", "reason": f"budget: {r.elapsed():.0f} s of {r.budget_s:.0f} s used, "
                                                  f"{r.reserved_s:.0f} s planned for the sections after it"}
        else:
            log(r, f"=== {name}")
            t = time.perf_counter()
            try:
                res = fn(r)
                rec = {"status": "failed" if res.get("failures") else "ok", **res}
                if res.get("failures"):
                    rec["error"] = "; ".join(res["failures"])
            except Skipped as e:
                rec = {"status": "skipped", "reason": str(e), **e.results}
            except Exception as e:
                rec = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-3000:]}
            rec["seconds"] = time.perf_counter() - t
            release(r)
            log(r, f"=== {name}: {rec['status']} in {rec['seconds']:.1f} s"
                   + (f" - {rec.get('error') or rec.get('reason')}" if rec["status"] != "ok" else ""))
        report["sections"][name] = rec
        report["total_s"] = r.elapsed()
        save(report)
    return report


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(report):
    S = report["sections"]
    lines = [f"`{report['command']}` ({report['started']}, {report['device']}, "
             f"{report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget)", "",
             "| section | status | seconds | result |", "|---|---|---|---|"]
    for name, rec in S.items():
        what = rec.get("headline") if rec["status"] == "ok" else (rec.get("error") or rec.get("reason") or "")
        lines.append(f"| {name} | {rec['status']} | {_f(rec.get('seconds'), '.1f')} | {what} |")
    tr = S.get("train", {})
    if tr.get("runs"):
        lines += ["", f"Training, {tr['shape']} ({_n(tr['params'])} params), sequence {tr['seq_len']}, "
                      f"{tr['optimizer']}:", "",
                  "| wrapping | objective | ckpt | rows | step ms | tok/s | MFU (989) | MFU (measured) | HFU (989) | "
                  "peak GiB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in tr["runs"]:
            lines.append(f"| {x.get('parallel', '-')} | {x.get('objective', '-')} | {x['grad_checkpointing']} | "
                         f"{x.get('rows', '-')} | "
                         f"{_f(x.get('step_s') and x['step_s'] * 1e3, '.0f')} | {_f(x.get('tok_s'), '.0f')} | "
                         f"{_f(x.get('mfu_vs_989'), '.1%')} | {_f(x.get('mfu_vs_measured'), '.1%')} | "
                         f"{_f(x.get('hfu_vs_989'), '.1%')} | {_f(x.get('peak_gib'), '.1f')} | "
                         f"{x['status']}{' ' + (x.get('reason') or x.get('error') or '') if x['status'] != 'ok' else ''} |")
    tor = S.get("torchrun", {})
    if tor.get("runs"):
        lines += ["", f"torchrun --nproc_per_node=1 ({tor['backend']}, {tor['subset']}):", "",
                  "| parallel | objective | status | seconds |", "|---|---|---|---|"]
        for x in tor["runs"]:
            lines.append(f"| {x['parallel']} | {x['loss']}{' (on-policy)' if x['onpolicy'] else ''} | {x['status']} | "
                         f"{_f(x.get('seconds'), '.1f')} |")
    ge = S.get("generate", {})
    if ge.get("decode"):
        lines += ["", f"Decode, {_n(ge['params'])} bf16 ({ge['weight_gib']:.1f} GiB), prompt {ge['prompt_len']}, "
                      f"{ge['new_tokens']} new tokens:", "",
                  "| mode | batch | first call s | steady tok/s | ms/step | bound tok/s | of bound | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in ge["decode"]:
            lines.append(f"| {d['mode']} | {d['batch']} | {_f(d.get('first_call_s'), '.1f')} | "
                         f"{_f(d.get('decode_tok_s'), '.0f')} | {_f(d.get('ms_per_step'), '.1f')} | "
                         f"{_f(d.get('bound_tok_s'), '.0f')} | {_f(d.get('fraction_of_bound'), '.0%')} | "
                         f"{d['status']}{' ' + (d.get('reason') or d.get('error') or '') if d['status'] != 'ok' else ''} |")
    ev = S.get("eval", {})
    if ev.get("batches"):
        lines += ["", f"Eval, {ev['questions']} of {ev['of']} prompts, batch {ev['batch_size']}, "
                      f"{'compiled' if ev['compiled'] else 'eager'} ({ev['mode']}): first batch (compile included) "
                      f"{_f(ev['first_batch_s'], '.1f')} s; steady {_f(ev['steady_questions_per_s'], '.1f')} q/s; "
                      f"all {ev['of']} at the steady rate {_f(ev['all_questions_steady_s'], '.1f')} s"]
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_bool(ap, "--tiny", help="every section on CPU with tiny shapes (< 1 min)")
    ap.add_argument("--budget_s", type=float, default=400.0,
                    help="seconds for all sections (each gets a planned share, see the module docstring)")
    ap.add_argument("--out", default=os.path.join("out", "bench_gpu.json"))
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--only", default=None, help="comma-separated sections (env always runs)")
    ap.add_argument("--jobs", type=int, default=None, help="torchrun runs at a time (default: 1 tiny, else "
                                                           "min(8, cpus/2))")
    ap.add_argument("--seq_len", type=int, default=1024, help="training sequence length")
    ap.add_argument("--eval_batch", type=int, default=64, help="eval section batch size")
    a = ap.parse_args(argv)
    if a.only is not None:
        unknown = set(a.only.split(",")) - {n for n, _ in SECTIONS}
        if unknown:
            ap.error(f"--only: unknown section(s) {', '.join(sorted(unknown))} (known: {', '.join(n for n, _ in SECTIONS)})")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    # Before the first CUDA allocation: growable segments, so the training configurations (different batch
    # shapes one after the other on a nearly full GPU) do not fail on fragmentation. Children inherit it.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() and not a.tiny else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if a.tiny and dev.type == "cpu":
        torch.set_num_threads(1)     # tiny shapes are per-op overhead: extra threads only spin (2-core CI machine)
    r = Run(device=dev, tiny=a.tiny, budget_s=a.budget_s, seq_len=a.seq_len, eval_batch=a.eval_batch,
            jobs=a.jobs or (1 if a.tiny else max(1, min(8, (os.cpu_count() or 2) // 2))))
    report = {"command": "python bench.py --gpu " + " ".join(argv), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
              time.gmtime()), "device": str(dev), "tiny": a.tiny, "budget_s": a.budget_s, "torch": torch.__version__,
              "PYTORCH_CUDA_ALLOC_CONF": os.environ["PYTORCH_CUDA_ALLOC_CONF"],
              "sections": {}}
    log(r, f"{report['command']} | device {dev} | torch {torch.__version__} | budget {a.budget_s:.0f} s -> {a.out}")
    run_sections(r, SECTIONS, report, save=lambda rep: write_json(a.out, rep),
                 only=None if a.only is None else set(a.only.split(",")))
    print("\n" + markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
