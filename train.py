"""
nanoIFT trainer: one flat loop for SFT, IFT, DPO, IPO, ORPO, SimPO and KTO (offline or on-policy).

  python train.py                                    # built-in demo: CPU, a few minutes, no downloads
  python train.py --loss=sft --max_steps=200         # any Config field as --key=value
  python train.py --config=configs/mistral7b_ift.json --init_from=PATH --data=ultrachat.jsonl
  torchrun --nproc_per_node=8 train.py --config=configs/mistral7b_ift.json --parallel=fsdp ...

Single process, DDP or FSDP2 is chosen from the environment torchrun sets (WORLD_SIZE) and
--parallel. Master weights stay fp32 (bf16 only for compute): at lr 5e-7 pure-bf16 weights would
round most updates away (SPEC §1.5).
"""
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import checkpoint
import data
import ift
import memplan
import onpolicy
import parallel
import refcache
import tokcache
from checkpoint import list_checkpoints  # noqa: F401  (public: tests and scripts list a run's checkpoints)
from model import ModelArgs, Transformer, atomic_dir  # noqa: F401
from refcache import data_fingerprint, fingerprint  # noqa: F401

PAIRWISE = ("dpo", "ipo", "orpo", "simpo", "kto")
NEEDS_REF = ("dpo", "ipo", "kto")


@dataclass
class Config:
    config: str = ""                # optional JSON preset, applied before the command line
    # data: "" = the built-in synthetic task (data.synthetic_task) with its own tokenizer. Else a file,
    # a glob, a directory of shards, or a comma-separated mixture, each PATH or PATH:N (first N rows)
    data: str = ""
    eval_data: str = ""
    split: str = ""                 # split of a shard directory in --data (train_sft, train_prefs, ...)
    eval_split: str = ""            # same for --eval_data (test_sft, test_prefs, ...)
    tokenizer: str = ""             # file or dir; default: init_from's (data.load_tokenizer), or trained for the demo
    n_train: int = 4000             # demo only: synthetic examples
    n_eval: int = 200
    max_length: int = 1024
    max_prompt_length: int = 512
    last_turn_only: bool = False
    # the IFT authors' data conventions (off: the data as it is; see README, deviations)
    empty_system: bool = False      # an empty system message first when a conversation has none
    dedup_prompts: bool = False     # one example per prompt, the last (their loader keys rows by prompt)
    prompt_from_chosen: bool = False  # pairs: prompt = chosen[:-1], whatever rejected's turns before its answer
    data_cache: str = ""            # tokenized --data, memory-mapped (tokcache.py): "" = out_dir/data_cache | DIR | none
    # model: init_from = HF checkpoint dir; "" = random init of the shape below
    init_from: str = ""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    hidden_dim: int = 688
    vocab_size: int = 512           # demo tokenizer size
    # objective
    loss: str = "ift"               # sft ift dpo ipo orpo simpo kto (+ rwr reinforce on-policy)
    lam: float = 0.2
    gamma: float = 0.95
    prop_kind: str = "loss"
    prop_side: str = "left"
    prop_norm: str = "L1"
    detach_weights: bool = False
    freeze_input_embeddings: bool = False
    lam_warmup_steps: int = 0
    min_lambda: float = 0.0         # λ warm-up runs from min_lambda to lam
    lam_noise_std: float = 0.0
    sft_token_mean: bool = False
    beta: float = 0.1               # DPO/IPO/KTO
    label_smoothing: float = 0.0
    reference_free: bool = False
    ipo_length_normalized: bool = False
    orpo_beta: float = 0.25
    simpo_beta: float = 2.0
    simpo_gamma_ratio: float = 0.8
    ref: str = "precompute"         # precompute (cached on disk, one model in memory) | online
    # on-policy sampling (onpolicy.py); offline when onpolicy_every == 0
    onpolicy_every: int = 0         # k: resample every k optimizer steps (0 = train on the dataset's answers)
    sampling: str = "onpolicy"      # onpolicy | offline (samples drawn once from the initial policy, reused)
    n_samples: int = 4
    sample_batch_size: int = 64     # rows (prompt x sample) per generate call
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    reward: str = "demo"            # demo | length | module:function
    pairs: str = "best_worst"       # best_worst | all
    pair_threshold: float = 0.2
    replay_ratio: float = 0.0
    rwr_temperature: float = 1.0
    rwr_cap: float = 20.0
    # optimisation
    optimizer: str = "adamw"        # adamw | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"        # cosine | linear | constant
    warmup_ratio: float = 0.05
    epochs: int = 4
    max_steps: int = 0              # 0 = epochs * steps per epoch
    micro_batch_size: int = 32
    grad_accum: int = 1
    grad_clip: float = 1.0
    # system
    parallel: str = "ddp"           # ddp | fsdp (only used under torchrun)
    precision: str = "auto"         # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: bool = False
    seed: int = 1337
    out_dir: str = "out"
    resume: bool = False
    dry_run: bool = False           # print the config and the data plan, then exit before building the model
    save_every: int = 0             # 0 = only at the end
    keep_last: int = 2
    eval_every: int = 0
    log_every: int = 10
    gen_eval: int = 100             # held-out generation exact match at the end (demo task only)
    progress: bool = True
    dist_timeout_s: int = 3600      # process-group timeout: must outlast rank 0 writing a checkpoint alone
    save_dtype: str = ""            # HF export dtype: "" = --init_from's (bf16 for Mistral; fp32 random init) | fp32 | bf16 | fp16


def parse_config(argv) -> Config:
    cfg, args = Config(), {}
    for a in argv:
        if a.startswith("--") and "=" not in a and isinstance(getattr(cfg, a[2:], None), bool):
            a += "=true"            # a bare boolean flag: --dry_run
        if not a.startswith("--") or "=" not in a:
            sys.exit(f"error: expected --key=value, got '{a}'")
        k, v = a[2:].split("=", 1)
        args[k] = v
    if "config" in args:
        try:
            with open(args["config"]) as f:
                preset = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: cannot read preset {args['config']}: {e}")
        for k, v in preset.items():
            _set(cfg, k, v, args["config"])
    for k, v in args.items():
        _set(cfg, k, v, "command line")
    for key, allowed in (("loss", ("sft", "ift") + PAIRWISE + ("rwr", "reinforce")), ("ref", ("precompute", "online")),
                         ("optimizer", ("adamw", "rmsprop")), ("schedule", ("cosine", "linear", "constant")),
                         ("parallel", ("ddp", "fsdp")), ("sampling", ("onpolicy", "offline")), ("precision", ("auto", "bf16", "fp32")),
                         ("prop_side", ("left", "right")), ("prop_kind", ("loss", "logps", "mask")),
                         ("prop_norm", ("L1", "L2", "softmax", "log")), ("pairs", ("best_worst", "all"))):
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if cfg.loss in ("rwr", "reinforce") and cfg.onpolicy_every == 0:
        sys.exit(f"error: --loss={cfg.loss} needs samples: set --onpolicy_every=K")
    return cfg


def _set(cfg, key, value, source):
    if key not in {f.name for f in dataclasses.fields(Config)}:
        sys.exit(f"error: unknown config key '{key}' ({source})")
    t = type(getattr(Config(), key))   # every field's default fixes its type: str, int, float or bool
    try:
        if t is bool and isinstance(value, str):
            value = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
        elif isinstance(value, str) or (t is float and type(value) is int):
            value = t(value)
        if type(value) is not t:
            raise ValueError
    except (KeyError, ValueError):
        sys.exit(f"error: bad value {value!r} for '{key}' ({source}): expected {t.__name__}")
    setattr(cfg, key, value)


# ---------------------------------------------------------------------------- setup
def load_data(cfg, rank, use_cache=True):
    """Tokenizer + train/eval examples. The demo trains its own tokenizer (rank 0, then shared). --data is
    tokenized once and cached (tokcache; not by --dry_run, which writes nothing)."""
    pairwise = cfg.loss in PAIRWISE
    tok_path = cfg.tokenizer or cfg.init_from   # a tokenizer file, or the checkpoint dir's tokenizer.json / .model

    def load_tokenizer(path):
        try:
            return data.load_tokenizer(path)
        except (OSError, ValueError, ImportError) as e:
            sys.exit(f"error: tokenizer: {e}")
    if cfg.data:
        if not tok_path:
            sys.exit("error: --data needs a tokenizer: --init_from=DIR or --tokenizer=PATH")
        tok = load_tokenizer(tok_path)
        train_src, eval_src = cfg.data, cfg.eval_data or None
    else:  # demo: synthetic rows, deterministic from the seed
        rows = data.synthetic_pairs(cfg.n_train + cfg.n_eval, cfg.seed) if pairwise else \
            data.synthetic_task(cfg.n_train + cfg.n_eval, cfg.seed)
        train_src, eval_src = rows[:cfg.n_train], rows[cfg.n_train:]
        if not tok_path:
            tok_path = os.path.join(cfg.out_dir, "tokenizer.model")
            if rank == 0 and not os.path.isfile(tok_path):
                os.makedirs(cfg.out_dir, exist_ok=True)
                data.train_tokenizer(data.corpus_text(rows), tok_path[:-len(".model")], cfg.vocab_size)
            parallel.barrier()
        tok = load_tokenizer(tok_path)
    load = data.load_pairs if pairwise else data.load_sft
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, prompt_from_chosen=cfg.prompt_from_chosen) \
        if pairwise else dict(max_length=cfg.max_length, last_turn_only=cfg.last_turn_only)
    kw.update(empty_system=cfg.empty_system, dedup_prompts=cfg.dedup_prompts)
    cache = "" if cfg.data_cache == "none" or not use_cache else cfg.data_cache or os.path.join(cfg.out_dir, "data_cache")
    train, stats = tokcache.load(load, train_src, tok, cache, rank, cfg.progress, split=cfg.split, **kw)
    evals = tokcache.load(load, eval_src, tok, cache, rank, cfg.progress, split=cfg.eval_split, **kw)[0] \
        if eval_src is not None else []
    if rank == 0:
        sources = stats.pop("sources", [])
        print(f"data: {len(train)} train / {len(evals)} eval examples; {stats}")
        for s in sources:   # a mixture: what each source gave
            print(f"  source {s['source']}: {s['rows']} rows from {s['files']} file(s)")
    if not train:
        sys.exit("error: no training example left after truncation")
    return tok, train, evals, (eval_src if not cfg.data else None)


def check_vocab(cfg, tok):
    """A tokenizer with more pieces than the model's embedding has rows would index past it (on GPU a
    device-side assert mid-run): refuse before the model is built. Reads only config.json."""
    from model import CheckpointError
    if not cfg.init_from:
        return   # a random init is sized to the tokenizer
    path = os.path.join(cfg.init_from, "config.json")
    try:
        with open(path) as f:
            vocab = ModelArgs.from_hf_config(json.load(f), path).vocab_size
    except FileNotFoundError:
        raise CheckpointError(f"{cfg.init_from}: no config.json (is --init_from a checkpoint directory?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if tok.vocab_size > vocab:
        raise CheckpointError(f"{tok.path}: the tokenizer has {tok.vocab_size} pieces but {path} has "
                              f"vocab_size {vocab}: ids >= {vocab} have no embedding (wrong --tokenizer?)")


def example_lengths(examples):
    if hasattr(examples, "lengths"):     # tokcache.CachedExamples: from its offsets, no example built
        return examples.lengths()
    return [len(e["input_ids"]) if "input_ids" in e else len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
            for e in examples]


def dry_run(cfg):
    """--dry_run: the config, the data (per source), its fingerprint and the batch plan of a run with
    WORLD_SIZE processes (environment, default 1), without building a model or starting processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    tok, train_ex, eval_ex, _ = load_data(cfg, 0, use_cache=False)
    check_vocab(cfg, tok)
    lengths = example_lengths(train_ex)
    steps = len(data.batch_plan(lengths, cfg.micro_batch_size, cfg.grad_accum, world, 0, cfg.seed, 0))
    gbs = cfg.micro_batch_size * cfg.grad_accum * world
    if steps == 0:
        sys.exit(f"error: {len(train_ex)} examples do not fill one global batch of {gbs}")
    plan = {"world_size": world, "global_batch": gbs, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
            "steps_per_epoch": steps, "total_steps": cfg.max_steps or steps * cfg.epochs,
            "tokens_per_step": round(gbs * sum(lengths) / len(lengths)), "data_fingerprint": data_fingerprint(tok, train_ex),
            "tokenizer": tok.path, "tokenizer_vocab": tok.vocab_size}
    print(json.dumps(dataclasses.asdict(cfg)))
    print("dry run: " + json.dumps(plan))
    return plan


def build_model(cfg, tok, device, fsdp_bf16=None):
    """fsdp_bf16 not None (FSDP2 with --init_from): loaded already sharded, each rank reading only its part
    of the files (parallel.load_sharded), so no rank ever holds the whole fp32 model."""
    check_vocab(cfg, tok)
    if cfg.init_from and fsdp_bf16 is not None:
        model = parallel.load_sharded(cfg.init_from, device, fsdp_bf16)
    elif cfg.init_from:
        model = Transformer.from_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    else:
        model = Transformer(model_args(cfg, tok)).init_weights(std=0.02, seed=cfg.seed).to(device)
    if cfg.freeze_input_embeddings and not model.args.tie_word_embeddings:
        model.embed_tokens.weight.requires_grad_(False)  # never trained: keeps DDP from waiting on it
    model.set_activation_checkpointing(cfg.grad_checkpointing)
    return model


def model_args(cfg, tok):
    """The architecture: --init_from's config.json, else a random init's from the config."""
    if cfg.init_from:
        from model import read_args
        return read_args(cfg.init_from)
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     head_dim=cfg.dim // cfg.n_heads, hidden_dim=cfg.hidden_dim, vocab_size=tok.vocab_size,
                     sliding_window=None, max_position_embeddings=cfg.max_length,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)


def memory_plan(cfg, tok, device, world, distributed, bf16, rank):
    """Print the per-GPU memory plan (memplan.py); on a GPU a run that cannot fit stops here, before the load."""
    a, par = model_args(cfg, tok), cfg.parallel if distributed else "single"
    kw = dict(micro_batch_size=cfg.micro_batch_size, seq_len=cfg.max_length, optimizer=cfg.optimizer, bf16=bf16,
              grad_checkpointing=cfg.grad_checkpointing, loss=cfg.loss)
    p = memplan.plan(a, world, par, **kw)
    if rank == 0:
        print(memplan.format_plan(p))
    if device.type == "cuda":
        why = memplan.does_not_fit(p, torch.cuda.get_device_properties(device).total_memory / memplan.GiB, a, world,
                                   par, **kw)
        if why:
            sys.exit(f"error: {why}")


def lr_at(cfg, step, total):
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac)


# ---------------------------------------------------------------------------- losses
def make_batch(cfg, examples, idx, pad_id, device, ctx, ref_table=None, ref_model=None):
    """A collated micro-batch and, for DPO/IPO/KTO, its reference log-probs (cached table or live model,
    the latter in the policy's own compute context: see refcache)."""
    if cfg.loss not in PAIRWISE:
        return data.to_device(data.collate([examples[i] for i in idx], pad_id), device), None
    batch = data.to_device(data.pair_batch(examples, idx, pad_id, cfg.loss == "kto"), device)
    ref = None
    if ref_table is not None:
        ref = torch.cat([ref_table[idx, 0], ref_table[idx, 1]] + ([ref_table[idx, 2]] if "kl" in batch else []))
        ref = ref.to(device)
    elif ref_model is not None:
        with ctx:
            ref = refcache.reference_logps(ref_model, batch)
    return batch, ref


def compute_loss(cfg, model, batch, ref_logps, lam):
    """(loss, metrics) for one micro-batch; ref_logps [2B] (+ KL rows) for DPO/IPO/KTO."""
    if cfg.loss == "sft":
        return ift.sft_loss(model, batch, token_mean=cfg.sft_token_mean)
    if cfg.loss == "ift":
        return ift.ift_loss(model, batch, lam=lam, gamma=cfg.gamma, kind=cfg.prop_kind, side=cfg.prop_side,
                            norm=cfg.prop_norm, detach_weights=cfg.detach_weights,
                            freeze_input_embeddings=cfg.freeze_input_embeddings)
    if cfg.loss in ("rwr", "reinforce"):   # held-out rows (dataset answers, no weights): plain SFT NLL
        return onpolicy.weighted_nll_loss(model, batch) if "weights" in batch else ift.sft_loss(model, batch)
    s, mean = ift.seq_logps(model, batch)
    B = s.shape[0] // 2
    if cfg.loss == "orpo":
        return ift.orpo_loss(mean[:B], mean[B:], beta=cfg.orpo_beta)
    if cfg.loss == "simpo":
        return ift.simpo_loss(mean[:B], mean[B:], beta=cfg.simpo_beta, gamma_ratio=cfg.simpo_gamma_ratio)
    if ref_logps is None:   # --reference_free: a reference that assigns every answer log-prob 0
        ref_logps = torch.zeros(3 * B if "kl" in batch else 2 * B, device=s.device)
    rc, rr = ref_logps[:B], ref_logps[B:2 * B]
    if cfg.loss == "dpo":
        return ift.dpo_loss(s[:B], s[B:], rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                            reference_free=cfg.reference_free)
    if cfg.loss == "ipo":
        n = (batch["labels"][:, 1:] != -100).sum(-1).to(s.dtype)
        return ift.ipo_loss(s[:B], s[B:], rc, rr, beta=cfg.beta, length_normalized=cfg.ipo_length_normalized,
                            n_chosen=n[:B], n_rejected=n[B:])
    with torch.no_grad():   # KL rows only set KTO's detached baseline z: no graph needed
        kl_s, _ = ift.seq_logps(model, batch["kl"])
    return ift.kto_loss(torch.cat([s[:B], s[B:]]), torch.cat([rc, rr]),
                        torch.arange(2 * B, device=s.device) < B, kl_s, ref_logps[2 * B:], beta=cfg.beta)


def frozen_reference(cfg, model, device, bf16, fsdp):
    """A frozen copy of the initial model for --ref=online and on-policy DPO/IPO (fresh samples need a live
    reference), else None. Under FSDP2 it is sharded like the policy, so it computes exactly as the policy
    does (bf16 parameters); elsewhere it runs in the policy's autocast context (make_batch)."""
    if cfg.loss not in NEEDS_REF or cfg.reference_free or not (cfg.ref == "online" or cfg.onpolicy_every):
        return None
    if fsdp and cfg.init_from:    # the policy was loaded sharded: load the reference the same way
        return parallel.load_sharded(cfg.init_from, device, bf16).eval().requires_grad_(False)
    import copy
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return parallel.wrap(ref, "fsdp", device, bf16, True) if fsdp else ref


def reference_tables(cfg, model, keys, train_ex, eval_ex, plans0, pad_id, device, ctx, rank, world):
    """Precomputed (train, eval) tables for DPO/IPO/KTO with --ref=precompute, computed by the policy as it
    will train (wrapped, in its compute context; refcache explains why); `keys` from `table_keys`."""
    kto, mbs = cfg.loss == "kto", cfg.micro_batch_size
    tables = []
    for ex, key, batches in ((train_ex, keys[0], refcache.train_batches(plans0[rank], plans0, len(train_ex), mbs, rank, world)),
                             (eval_ex, keys[1], refcache.eval_batches(len(eval_ex), mbs, rank, world, kto))):
        path = os.path.join(cfg.out_dir, f"ref_logps-{cfg.loss}-{key}.pt")
        tables.append(refcache.precompute(parallel.unwrap(model), ex, batches, pad_id, kto, device, ctx, path, rank,
                                          world, cfg.progress) if ex else None)
    return tables


def table_keys(cfg, model, tok, train_ex, eval_ex, bf16, distributed):
    """Cache keys of the reference tables, from the initial (unwrapped) weights, or None if no table is used."""
    if cfg.loss not in NEEDS_REF or cfg.reference_free or cfg.ref == "online" or cfg.onpolicy_every:
        return None
    compute = f"{'bf16' if bf16 else 'fp32'}-{cfg.parallel if distributed else 'single'}"
    return [refcache.fingerprint(cfg, refcache.data_fingerprint(tok, ex), model, compute) for ex in (train_ex, eval_ex)]


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(cfg, model, examples, pad_id, device, ctx, ref_table, ref_model, rank, world):
    """Held-out loss and metrics, batches sharded over ranks, reduced globally (weighted by rows)."""
    batches = refcache.eval_batches(len(examples), cfg.micro_batch_size, rank, world, cfg.loss == "kto")
    if not batches:
        return {}
    model.eval()
    keys, tot = None, None
    for idx in batches:
        real = idx is not None
        idx = idx if real else list(range(min(cfg.micro_batch_size, len(examples))))  # a dummy: same forwards
        batch, r = make_batch(cfg, examples, idx, pad_id, device, ctx, ref_table, ref_model)
        with ctx:
            loss, m = compute_loss(cfg, model, batch, r, cfg.lam)
        vals = {"loss": loss, **m}
        keys = keys or list(vals)
        v = torch.stack([torch.as_tensor(vals[k], device=device).detach().double().reshape(()) for k in keys])
        tot = (tot if tot is not None else torch.zeros(len(keys) + 1, dtype=torch.float64, device=device))
        tot += torch.cat([v * len(idx), v.new_tensor([len(idx)])]) * real
    model.train()
    tot = parallel.all_reduce(tot)
    return {f"eval/{k}": float(x) for k, x in zip(keys, tot[:-1] / tot[-1].clamp(min=1))}


@torch.no_grad()
def generation_exact_match(model, tok, rows, n, device, ctx, rank, world, lockstep):
    """Held-out exact match on the demo task: greedy answers scored by data.check_answer, prompts
    sharded over ranks (every rank runs the same number of generate calls: FSDP2 forwards are collective)."""
    rows = rows[:n]
    chunks = [rows[i:i + 32] for i in range(0, len(rows), 32)]
    mine = parallel.even_share(chunks, rank, world)
    model.eval()
    hits, example = torch.zeros(2, dtype=torch.float64, device=device), ""
    for c in mine:
        part = c if c is not None else chunks[0]
        prompts = [data.render_chat(tok, r["messages"][:-1], add_generation_prompt=True)[0] for r in part]
        with ctx:
            outs = model.generate(prompts, 48, stop_ids=[tok.eos_id], until_all_stop=not lockstep)
        if c is not None:
            hits += torch.tensor([sum(data.check_answer(r, tok.decode(o)) for r, o in zip(part, outs)), len(part)],
                                 dtype=torch.float64, device=device)
            example = example or tok.decode(outs[0])
    model.train()
    hits = parallel.all_reduce(hits)
    return float(hits[0] / hits[1].clamp(min=1)), example


def global_flag(bad: bool, device) -> bool:
    """True on every rank if any rank saw `bad` (one tiny all-reduce: all ranks then stop together)."""
    return bool(parallel.all_reduce(torch.tensor([float(bad)], device=device), dist.ReduceOp.MAX)[0] > 0)


# ---------------------------------------------------------------------------- the loop
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, local, world, distributed = parallel.setup(cfg.dist_timeout_s)
    try:
        return train(cfg, rank, local, world, distributed)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, rank, local, world, distributed):
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    fsdp = distributed and cfg.parallel == "fsdp"
    # FSDP2's MixedPrecisionPolicy casts for us; otherwise autocast (weights stay fp32 either way).
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not fsdp else nullcontext()
    torch.manual_seed(cfg.seed)
    checkpoint.export_dtype(cfg)      # a bad --save_dtype fails now, not at the first save
    os.makedirs(cfg.out_dir, exist_ok=True)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")     # TF32 for the fp32 matmuls (fp32 runs, fp32 heads)
    tok, train_ex, eval_ex, demo_eval_rows = load_data(cfg, rank)
    memory_plan(cfg, tok, device, world, distributed, bf16, rank)
    t_load, sharded = time.time(), fsdp and bool(cfg.init_from)
    model = build_model(cfg, tok, device, bf16 if sharded else None)
    data_fp = refcache.data_fingerprint(tok, train_ex)

    lengths = example_lengths(train_ex)
    plan_of = lambda epoch, r=rank: data.batch_plan(lengths, cfg.micro_batch_size, cfg.grad_accum, world, r, cfg.seed, epoch)
    steps_per_epoch = len(plan_of(0))
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_ex)} examples do not fill one global batch of "
                 f"{cfg.micro_batch_size * cfg.grad_accum * world}")
    total = cfg.max_steps or steps_per_epoch * cfg.epochs

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.RMSprop
    gbs = cfg.micro_batch_size * cfg.grad_accum * world
    run_info = {"data_fingerprint": data_fp, "world_size": world, "global_batch": gbs,
                "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum}
    state = {"step": 0, "epoch": 0, **run_info}
    # The reference is the initial model: copied / keyed before wrapping, computed before any resume.
    keys = table_keys(cfg, model, tok, train_ex, eval_ex, bf16, distributed)
    ref_model = frozen_reference(cfg, model, device, bf16, fsdp)
    model = model if sharded else parallel.wrap(model, cfg.parallel, device, bf16, distributed)
    if rank == 0:       # the load's peak, apart from training's (whose peak counter starts here)
        print(memplan.load_report(time.time() - t_load, device, sharded))
    # Before any forward: FSDP2 leaves the root's parameters unsharded after a no-grad forward, and an
    # optimizer built then would hold those instead of the sharded master weights.
    opt = opt_cls(model.parameters() if fsdp else params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref_table = eval_ref_table = None
    if keys:
        ref_table, eval_ref_table = reference_tables(cfg, model, keys, train_ex, eval_ex,
                                                     [plan_of(0, r) for r in range(world)], tok.pad_id, device, ctx,
                                                     rank, world)
    sampler = onpolicy.Sampler(cfg, tok, train_ex, rank, world) if cfg.onpolicy_every else None
    resume_from = checkpoint.latest(cfg.out_dir) if cfg.resume else None
    if resume_from:
        state = checkpoint.load(resume_from, model, opt)
        why = checkpoint.schedule_mismatch(state, run_info)
        if why:
            sys.exit(f"error: {why} ({resume_from})")
        if sampler is not None and "sampler" in state:
            sampler.load_state_dict(state["sampler"][rank])
        if rank == 0:
            print(f"resumed from {resume_from} at step {state['step']}")
            if state.get("data_fingerprint") != data_fp:
                print(f"warning: the data differ from the checkpoint's (fingerprint {data_fp} vs "
                      f"{state.get('data_fingerprint')}): the resumed run will not replay the same batches")
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg)))
        tokens_per_step = gbs * sum(lengths) / len(lengths)
        mode = cfg.parallel if distributed else "single process"
        print(f"world {world} ({mode}) | global batch {gbs} | ~{tokens_per_step:.0f} tokens/step | data {data_fp} | "
              f"{steps_per_epoch} steps/epoch | {total} steps | "
              f"{parallel.unwrap(model).num_params() / 1e6:.2f}M params | device {device} | bf16 {bf16}")

    def save(state):
        extra = {"sampler": parallel.gather_objects(sampler.state_dict())} if sampler is not None else {}
        return checkpoint.save(cfg, model, opt, {**state, **extra}, tok, rank)

    from tqdm import tqdm
    bar = tqdm(total=total, initial=state["step"], disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    t0, tokens, last_log, plan_epoch = time.time(), 0, {}, None
    busy, peak = 0.0, memplan.peak_flops(device, bf16)       # rates count training time since the last log
    flops_tok = memplan.flops_per_token(parallel.unwrap(model), cfg.max_length, cfg)
    model.train()
    while state["step"] < total:
        step, t0 = state["step"], time.time()
        epoch, k = divmod(step, steps_per_epoch)
        if plan_epoch != epoch:
            plan, plan_epoch = plan_of(epoch), epoch
        lr = lr_at(cfg, step, total)
        for g in opt.param_groups:
            g["lr"] = lr
        lam = ift.lambda_schedule(step, lam=cfg.lam, warmup_steps=cfg.lam_warmup_steps, min_lambda=cfg.min_lambda,
                                  max_lambda=cfg.lam, noise_std=cfg.lam_noise_std, seed=cfg.seed)
        if sampler is not None and sampler.due(step):
            horizon = total if cfg.sampling == "offline" else min(step + cfg.onpolicy_every, total)
            upcoming = [i for s in range(step, horizon)
                        for mb in plan_of(s // steps_per_epoch)[s % steps_per_epoch] for i in mb]
            sampler.refresh(parallel.unwrap(model), step, upcoming, device, ctx, lockstep=fsdp)  # *current* weights
        acc = {}
        for a, idx in enumerate(plan[k]):
            if sampler is not None:
                batch, ref = sampler.batch(idx, ref_model, device, ctx)
            else:
                batch, ref = make_batch(cfg, train_ex, idx, tok.pad_id, device, ctx, ref_table, ref_model)
            with parallel.no_sync(model, a == len(plan[k]) - 1), ctx:
                loss, m = compute_loss(cfg, model, batch, ref, lam)
                if "loss_scale" in batch:      # on-policy micro-batch without a usable pair
                    loss = loss * batch["loss_scale"]
                (loss / len(plan[k])).backward()
            tokens += int(batch["attention_mask"].sum()) * world
            for key, v in {"loss": loss, **m}.items():
                acc[key] = acc.get(key, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / len(plan[k])
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        # One rank's NaN must stop every rank, or the others wait in the next collective until the timeout.
        if global_flag(not (math.isfinite(acc["loss"]) and math.isfinite(float(gnorm))), device):
            last = checkpoint.latest(cfg.out_dir)
            raise SystemExit(f"error: non-finite loss or grad norm at step {step} (rank {rank}: loss {acc['loss']}, "
                             f"grad norm {float(gnorm)}); stopping without saving. "
                             f"Last good checkpoint: {last or 'none'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        busy += time.time() - t0
        state = {"step": step + 1, "epoch": (step + 1) // steps_per_epoch, **run_info}
        bar.update(1)
        if state["step"] % cfg.log_every == 0 or state["step"] == total:
            if distributed:   # log the global mean, not rank 0's share (every rank joins the reduce)
                vals = parallel.all_reduce(torch.tensor(list(acc.values()), device=device))
                acc = dict(zip(acc, (vals / world).tolist()))
        if rank == 0 and (state["step"] % cfg.log_every == 0 or state["step"] == total):
            dt = max(busy, 1e-9)
            rec = {"step": state["step"], "lr": lr, "lam": lam, "grad_norm": float(gnorm), "tok_s": tokens / dt, **acc}
            if memplan.mfu(flops_tok, tokens, dt, peak, world) is not None:
                rec["mfu"] = memplan.mfu(flops_tok, tokens, dt, peak, world)
            if device.type == "cuda":
                rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if sampler is not None:
                rec.update(sampler.stats)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{acc['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}",
                            **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))
            last_log, tokens, busy = rec, 0, 0.0
        if cfg.eval_every and state["step"] % cfg.eval_every == 0:
            ev = evaluate(cfg, model, eval_ex, tok.pad_id, device, ctx, eval_ref_table, ref_model, rank, world)
            if rank == 0 and ev:
                bar.write(" ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": state["step"], **ev}) + "\n")
        if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
            save(state)
    bar.close()
    path = save(state)
    summary = {"final_train_loss": last_log.get("loss"), "tok_s": last_log.get("tok_s"), "checkpoint": path}
    summary.update(evaluate(cfg, model, eval_ex, tok.pad_id, device, ctx, eval_ref_table, ref_model, rank, world))
    if demo_eval_rows is not None and cfg.gen_eval:
        em, example = generation_exact_match(parallel.unwrap(model), tok, demo_eval_rows, cfg.gen_eval, device, ctx,
                                             rank, world, lockstep=fsdp)
        summary["heldout_exact_match"] = em
        if rank == 0:
            print(f"held-out generation exact match: {em:.3f} on {min(cfg.gen_eval, len(demo_eval_rows))} "
                  f"prompts (e.g. {example!r})")
    if rank == 0:
        print(json.dumps(summary))
        plot_curve(metrics_path)
    return summary


def plot_curve(metrics_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional dependency
    recs = [json.loads(l) for l in open(metrics_path)] if os.path.isfile(metrics_path) else []
    recs = [r for r in recs if "loss" in r]
    if recs:
        plt.figure(figsize=(6, 4))
        plt.plot([r["step"] for r in recs], [r["loss"] for r in recs])
        plt.xlabel("step"), plt.ylabel("train loss")
        plt.savefig(metrics_path.replace(".jsonl", ".png"), dpi=100)
        plt.close()


def cli(argv):
    """The command line: --dry_run, else main(). The project's user errors, bad data (file:line, field)
    or a checkpoint that does not fit, end the run with one line on stderr and exit code 2 (--debug: the
    traceback instead); anything else is a bug and keeps its traceback."""
    from model import CheckpointError
    debug, argv = "--debug" in argv, [a for a in argv if a != "--debug"]
    try:
        cfg = parse_config(argv)
        return dry_run(cfg) if cfg.dry_run else main(argv)
    except (data.DataError, CheckpointError) as e:
        if debug:
            raise
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(sys.argv[1:])
