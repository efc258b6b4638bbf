"""
nanoIFT trainer: one flat loop for SFT, IFT, DPO, IPO, ORPO, SimPO and KTO (offline or on-policy).

  python train.py                                    # built-in demo: CPU, a few minutes, no downloads
  python train.py --loss=sft --max_steps=200         # any Config field as --key=value
  python train.py --config=configs/mistral7b_ift.json --init_from=PATH --data=ultrachat.jsonl
  torchrun --nproc_per_node=8 train.py --config=configs/mistral7b_ift.json --parallel=fsdp ...

Single process, DDP or FSDP2 is chosen from the environment torchrun sets (WORLD_SIZE) and
--parallel. Master weights stay fp32 (bf16 only for compute): at lr 5e-7 pure-bf16 weights would
round most updates away (METHOD §1.5).
"""
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

import data
import ift
import onpolicy
import reference
import tokenizer
from generate import generate
from infra import atomic, checkpoint, flags, hf_io, interrupt, loggers, memplan, parallel, tokcache
from infra.hf_io import CheckpointError
from model import ModelArgs, Transformer
from reference import Reference

PAIRWISE = ("dpo", "ipo", "orpo", "simpo", "kto")


@dataclass
class Config:
    config: str = ""                # JSON preset (e.g. configs/s1_mistral7b_ift.json), under the command line
    # data
    data: str = ""                  # "" = the built-in demo task; else a file, glob, shard directory or a
                                    # comma-separated mixture, each PATH or PATH:N (its first N rows)
    eval_data: str = ""             # held-out data, same forms as --data ("" with the demo: its held-out rows)
    split: str = ""                 # split of a shard directory in --data (train_sft, train_prefs, ...)
    eval_split: str = ""            # same for --eval_data (test_sft, test_prefs, ...)
    tokenizer: str = ""             # file or dir; default: init_from's, else one trained on the data (random init)
    n_train: int = 4000             # demo only: synthetic training examples
    n_eval: int = 200               # demo only: synthetic held-out examples
    max_length: int = 1024          # tokens per example (longer ones keep their start)
    max_prompt_length: int = 512    # pairs: the prompt is cut to this first
    last_turn_only: bool = False    # supervise only the last assistant turn (default: every one)
    empty_system: bool = False      # authors' convention: an empty system message when a conversation has none
    dedup_prompts: bool = False     # authors' convention: one example per prompt, the last one
    prompt_from_chosen: bool = False  # authors' convention: pair prompt = chosen[:-1]
    data_cache: str = ""            # tokenized --data, memory-mapped (infra/tokcache.py): "" = out_dir/data_cache | DIR | none
    # model
    init_from: str = ""             # Hugging Face checkpoint dir to start from; "" = random init of this shape:
    dim: int = 256                  # random init: hidden size
    n_layers: int = 4               # random init: blocks
    n_heads: int = 8                # random init: attention heads
    n_kv_heads: int = 4             # random init: key/value heads (grouped-query attention)
    hidden_dim: int = 688           # random init: SwiGLU intermediate size
    vocab_size: int = 512           # size of a tokenizer trained here (demo, or --data from scratch)
    # objective
    loss: str = "ift"               # sft ift dft dpo ipo orpo simpo kto (+ rwr reinforce ppo grpo, on-policy)
    lam: float = 0.2                # IFT: lambda, weight of the model's own guesses in the input embeddings
    gamma: float = 0.95             # IFT: discount of the loss that follows each token (0 = plain weights)
    prop_kind: str = "loss"         # IFT: what is propagated: loss | logps | mask
    prop_side: str = "left"         # IFT: left (sum over later tokens) | right (earlier; couples rows)
    prop_norm: str = "L1"           # IFT: L1 | L2 | softmax | log
    detach_weights: bool = False    # IFT: constant token weights (authors: gradient flows through them)
    freeze_input_embeddings: bool = False  # IFT: never train the input embeddings (the authors' code)
    lam_warmup_steps: int = 0       # IFT: lambda rises linearly from min_lambda over this many steps
    min_lambda: float = 0.0         # IFT: start of the lambda warm-up
    lam_noise_std: float = 0.0      # IFT: multiplicative Gaussian noise on lambda, one draw per step
    sft_token_mean: bool = False    # SFT: mean over the micro-batch's tokens (default: per sequence, then batch)
    beta: float = 0.1               # DPO/IPO/KTO: beta
    label_smoothing: float = 0.0    # DPO: conservative-DPO epsilon
    reference_free: bool = False    # DPO/IPO/KTO: a reference that gives every answer log-prob 0
    ipo_length_normalized: bool = False  # IPO: length-normalised log-ratios (TRL) instead of summed
    orpo_beta: float = 0.25         # ORPO: weight of the odds-ratio term
    simpo_beta: float = 2.0         # SimPO: beta
    simpo_gamma_ratio: float = 0.8  # SimPO: target margin gamma / beta
    ref: str = "precompute"         # DPO/IPO/KTO reference: precompute (cached on disk) | online (frozen copy)
    # on-policy sampling (onpolicy.py)
    onpolicy_every: int = 0         # resample every k optimizer steps (0 = train on the dataset's answers)
    sampling: str = "onpolicy"      # onpolicy | offline (samples drawn once from the initial policy, reused)
    n_samples: int = 4              # samples per prompt
    sample_batch_size: int = 64     # rows (prompt x sample) per generate call
    temperature: float = 1.0        # sampling temperature
    top_p: float = 1.0              # nucleus sampling mass
    max_new_tokens: int = 32        # tokens per sample at most
    reward: str = "demo"            # demo | length | gsm8k | arc | module:fn(prompt, response[, data row])
    pairs: str = "best_worst"       # DPO-style pairs from the samples: best_worst | all
    pair_threshold: float = 0.2     # pairs closer in reward than this are skipped
    replay_ratio: float = 0.0       # best-of-N: fraction of rows that keep the dataset's answer
    rwr_temperature: float = 1.0    # RWR: weight = min(exp(r / T), cap)
    rwr_cap: float = 20.0           # RWR: weight cap
    clip_low: float = 0.2           # PPO/GRPO: the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2          # PPO/GRPO: upper clip (larger = DAPO's "clip-higher")
    kl_coef: float = 0.0            # PPO/GRPO: weight of the per-token KL to the reference (0 = no reference)
    kl_estimator: str = "k3"        # PPO/GRPO: k3 (GRPO, TRL) | logratio (log pi - log pi_ref: paper's PPO)
    scale_rewards: str = "group"    # GRPO: advantage / std of the prompt's group | round's (batch) | none (Dr. GRPO)
    pg_average: str = "sequence"    # PPO/GRPO: sequence (mean of sample means) | token | constant (/ max_new_tokens)
    # optimisation
    optimizer: str = "adamw"        # adamw | rmsprop
    lr: float = 1e-3                # peak learning rate
    weight_decay: float = 0.0       # decoupled weight decay
    schedule: str = "cosine"        # after warm-up: cosine | linear | constant
    warmup_ratio: float = 0.05      # fraction of the steps with a linear warm-up
    epochs: int = 4                 # passes over the data (when max_steps is 0)
    max_steps: int = 0              # optimizer steps; 0 = epochs x steps per epoch
    micro_batch_size: int = 32      # examples (pairs) per forward, per process
    grad_accum: int = 1             # micro-batches per optimizer step
    grad_clip: float = 1.0          # gradient-norm clip (0 = off)
    # system
    parallel: str = "ddp"           # under torchrun: ddp | fsdp (FSDP2, sharded fp32 master weights)
    precision: str = "auto"         # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32; weights stay fp32
    grad_checkpointing: bool = False  # recompute each block in backward (less memory, ~1/3 more compute)
    seed: int = 1337                # data order, init, demo data, sampling
    out_dir: str = "out"            # checkpoints, metrics.jsonl, caches
    resume: bool = False            # continue from the newest checkpoint in out_dir
    overwrite: bool = False         # start a new run in an out_dir that holds another run's checkpoints
    eval_only: bool = False         # evaluate init_from (or, with --resume, out_dir's newest checkpoint) on --eval_data
                                    # (neither --data nor --eval_data: the demo's held-out rows); writes nothing
    dry_run: bool = False           # print the config and the data plan, then exit before building the model
    save_every: int = 0             # checkpoint every N steps (0 = only at the end)
    save_every_min: float = 30.0    # also checkpoint when this many minutes passed since the last one (0 = off): a
                                    # kill loses at most that; SIGINT/SIGTERM save at once (infra/interrupt.py)
    keep_last: int = 2              # checkpoints kept (the newest is never deleted)
    eval_every: int = 0             # held-out loss every N steps (0 = only at the end)
    log_every: int = 10             # metrics every N steps (a plain line when the bar is off or not a terminal)
    log_to: str = ""                # also send metrics.jsonl's records to tensorboard | wandb | tensorboard,wandb
                                    # (rank 0; infra/loggers.py; each needs its package installed)
    wandb_project: str = "nanoift"  # W&B project of --log_to=wandb (the run is named after out_dir)
    gen_eval: int = 100             # demo only: held-out generation exact match on this many prompts at the end
    progress: bool = True           # progress bars (only on a terminal)
    dist_timeout_s: int = 3600      # process-group timeout: must outlast rank 0 writing a checkpoint alone
    save_dtype: str = ""            # HF export dtype: "" = --init_from's (bf16 for Mistral; fp32 random init) | fp32 | bf16 | fp16


CHOICES = {"loss": ("sft", "ift", "dft") + PAIRWISE + ("rwr", "reinforce") + onpolicy.PG_LOSSES,
           "ref": ("precompute", "online"), "kl_estimator": ift.KL_ESTIMATORS, "scale_rewards": ift.REWARD_SCALES,
           "pg_average": ift.PG_AVERAGES,
           "optimizer": ("adamw", "rmsprop"), "schedule": ("cosine", "linear", "constant"), "parallel": ("ddp", "fsdp"),
           "sampling": ("onpolicy", "offline"), "precision": ("auto", "bf16", "fp32"), "prop_side": ("left", "right"),
           "prop_kind": ("loss", "logps", "mask"), "prop_norm": ("L1", "L2", "softmax", "log"),
           "pairs": ("best_worst", "all")}


def parse_config(argv) -> Config:
    """defaults < --config preset < command line. Every option: `python train.py --help`."""
    ap = flags.dataclass_parser(Config, __doc__, CHOICES, epilog="--debug: tracebacks for user errors too")
    given = vars(ap.parse_args(argv))
    cfg = Config()
    if given.get("config"):
        try:
            with open(given["config"]) as f:
                preset = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"error: cannot read preset {given['config']}: {e}")
        for k, v in preset.items():
            _set(cfg, k, v, given["config"])
    for k, v in given.items():
        setattr(cfg, k, v)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if cfg.loss in ("rwr", "reinforce") + onpolicy.PG_LOSSES and cfg.onpolicy_every == 0:
        sys.exit(f"error: --loss={cfg.loss} needs samples: set --onpolicy_every=K")
    if cfg.loss in onpolicy.PG_LOSSES and cfg.kl_coef > 0 and cfg.reference_free:
        sys.exit(f"error: --kl_coef={cfg.kl_coef} needs a reference model: drop --reference_free (or set --kl_coef=0)")
    loggers.check(cfg.log_to)          # a logger's missing package: one line now, not after the model loads
    if cfg.loss == "kto" and cfg.micro_batch_size < 2:
        sys.exit(f"error: --loss=kto needs --micro_batch_size >= 2 (its KL estimate pairs the rows of a "
                 f"micro-batch), got {cfg.micro_batch_size}")
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
    """Tokenizer + train/eval examples (+ the demo's held-out rows). Without --tokenizer or --init_from (the
    demo, or --data from scratch) rank 0 trains a sentencepiece tokenizer on the training text into out_dir,
    named after what it was trained on. The vocabulary is checked against the model before tokenizing.
    --data is tokenized once and cached (tokcache; not by --dry_run, which writes nothing)."""
    pairwise = cfg.loss in PAIRWISE
    if cfg.eval_only:
        return load_eval_only(cfg, rank)
    if cfg.data:
        train_src, eval_src, demo = cfg.data, cfg.eval_data or None, None
    else:  # demo: synthetic rows, deterministic from the seed
        rows = data.synthetic_pairs(cfg.n_train + cfg.n_eval, cfg.seed) if pairwise else \
            data.synthetic_task(cfg.n_train + cfg.n_eval, cfg.seed)
        train_src, eval_src, demo = rows[:cfg.n_train], rows[cfg.n_train:], rows[cfg.n_train:]
    tok_path = cfg.tokenizer or cfg.init_from   # a tokenizer file, or the checkpoint dir's tokenizer.json / .model
    if not tok_path:
        what = [cfg.data or "demo", cfg.split, cfg.seed, cfg.n_train, cfg.n_eval, pairwise, cfg.vocab_size]
        tok_path = os.path.join(cfg.out_dir, f"tokenizer-{hashlib.sha256(repr(what).encode()).hexdigest()[:8]}.model")
        if rank == 0 and not os.path.isfile(tok_path):
            os.makedirs(cfg.out_dir, exist_ok=True)
            text = data.corpus_text(rows if not cfg.data else [r for _, r in data.read_source(cfg.data, cfg.split)[0]])
            print(f"training a sentencepiece tokenizer of at most {cfg.vocab_size} pieces (--vocab_size) on the "
                  f"training text -> {tok_path}")
            try:
                pieces = tokenizer.train_tokenizer(text, tok_path[:-len(".model")], cfg.vocab_size).vocab_size
                print(f"tokenizer: {pieces} pieces")
            except RuntimeError as e:   # sentencepiece's own words, e.g. a vocabulary smaller than the characters
                sys.exit(f"error: cannot train a {cfg.vocab_size}-piece tokenizer on {cfg.data or 'the demo data'} "
                         f"(--vocab_size; its 256 byte pieces come first): {str(e).splitlines()[-1]}")
        parallel.barrier()
    tok = open_tokenizer(cfg, tok_path)
    load, kw = example_loader(cfg)
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
    return tok, train, evals, demo


def check_inputs(cfg, rank):
    """Every row of --data and --eval_data, checked against --loss before anything is written (out_dir, a
    tokenizer trained on the data, the data cache), on every rank alike: an error names file:line and the
    field. A non-pairwise objective on preference rows trains on their chosen answers: said once per file."""
    for spec, split in ((cfg.data, cfg.split), (cfg.eval_data, cfg.eval_split)):
        if spec and data.check_rows(spec, split, cfg.loss in PAIRWISE, cfg.prompt_from_chosen) and rank == 0:
            print(f"note: {spec} holds preference pairs: --loss={cfg.loss} trains on their chosen answers "
                  f"(the rejected ones are not used)")


def load_eval_only(cfg, rank):
    """--eval_only: the tokenizer and the held-out rows only (--eval_data, else the demo's when no --data is
    given either); no training set, no batch plan, no data cache (eval-only writes nothing)."""
    pairwise = cfg.loss in PAIRWISE
    demo = None
    if cfg.eval_data:
        src = cfg.eval_data
    elif cfg.data:
        sys.exit("error: --eval_only evaluates --eval_data (--data is a training set): pass --eval_data=FILE")
    else:
        rows = data.synthetic_pairs(cfg.n_train + cfg.n_eval, cfg.seed) if pairwise else \
            data.synthetic_task(cfg.n_train + cfg.n_eval, cfg.seed)
        src = demo = rows[cfg.n_train:]
        if rank == 0:
            print(f"--eval_only without --eval_data: evaluating the built-in demo task's {cfg.n_eval} held-out rows")
    tok_path = cfg.tokenizer or cfg.init_from
    if not tok_path:     # --resume: the tokenizer saved with out_dir's newest checkpoint
        found = checkpoint.list_checkpoints(cfg.out_dir) if cfg.resume else []
        if not found:
            sys.exit("error: --eval_only needs a model: --init_from=CHECKPOINT (or --resume in a run's --out_dir)")
        tok_path = found[-1]
    tok = open_tokenizer(cfg, tok_path)
    load, kw = example_loader(cfg)
    evals, stats = load(src, tok, split=cfg.eval_split, progress=cfg.progress and rank == 0, **kw)
    if rank == 0:
        stats.pop("sources", None)
        print(f"data: {len(evals)} eval examples from {cfg.eval_data or 'the demo task'}; {stats}")
    if not evals:
        sys.exit(f"error: no held-out example left in {cfg.eval_data or 'the demo rows'} after truncation")
    return tok, [], evals, demo


def open_tokenizer(cfg, tok_path):
    try:
        tok = tokenizer.load_tokenizer(tok_path)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: tokenizer: {e}")
    check_vocab(cfg, tok)
    return tok


def example_loader(cfg):
    """(data.load_pairs or data.load_sft, its options from the config) for --loss."""
    if cfg.loss in PAIRWISE:
        kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  prompt_from_chosen=cfg.prompt_from_chosen)
    else:
        kw = dict(max_length=cfg.max_length, last_turn_only=cfg.last_turn_only)
    kw.update(empty_system=cfg.empty_system, dedup_prompts=cfg.dedup_prompts)
    return (data.load_pairs if cfg.loss in PAIRWISE else data.load_sft), kw


def check_vocab(cfg, tok):
    """A tokenizer with more pieces than the model's embedding has rows would index past it (on GPU a
    device-side assert mid-run): refuse before the model is built. Reads only config.json."""
    if not cfg.init_from:
        return   # a random init is sized to the tokenizer
    path = os.path.join(cfg.init_from, "config.json")
    try:
        with open(path) as f:
            vocab = hf_io.args_from_hf_config(json.load(f), path).vocab_size
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
    if cfg.init_from:
        cfg.init_from = checkpoint.resolve_model(cfg.init_from)
    check_inputs(cfg, 0)
    tok, train_ex, eval_ex, _ = load_data(cfg, 0, use_cache=False)
    lengths = example_lengths(train_ex)
    steps = len(data.batch_plan(lengths, cfg.micro_batch_size, cfg.grad_accum, world, 0, cfg.seed, 0))
    gbs = cfg.micro_batch_size * cfg.grad_accum * world
    if steps == 0:
        sys.exit(f"error: {len(train_ex)} examples do not fill one global batch of {gbs}")
    plan = {"world_size": world, "global_batch": gbs, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
            "steps_per_epoch": steps, "total_steps": cfg.max_steps or steps * cfg.epochs,
            "tokens_per_step": round(gbs * sum(lengths) / len(lengths)), "data_fingerprint": reference.data_fingerprint(tok, train_ex),
            "tokenizer": tok.path, "tokenizer_vocab": tok.vocab_size}
    print(json.dumps(shown_config(cfg, model_args(cfg, tok))))
    print("dry run: " + json.dumps(plan))
    return plan


# Which objectives a field's help prefix ("IFT: ...", "DPO/IPO/KTO: ...") names; SFT's options serve DFT too.
_OBJECTIVE_TAGS = {"dft": {"SFT", "DFT"}}
_OBJECTIVE_NAMES = {"SFT", "IFT", "DPO", "IPO", "KTO", "ORPO", "SIMPO", "RWR", "PPO", "GRPO"}
_ONPOLICY_FIELDS = ("sampling", "n_samples", "sample_batch_size", "temperature", "top_p", "max_new_tokens", "reward",
                    "pairs", "pair_threshold", "replay_ratio", "rwr_temperature", "rwr_cap")


def shown_config(cfg, args) -> dict:
    """The config as it applies to this run, for the start-up print: the model's real shape (`args`: from
    --init_from's config.json, or a random init sized to the tokenizer), and without the options of other
    objectives, of the demo (with --data), or of sampling (without --onpolicy_every). trainer_state.pt keeps
    the full config."""
    out = dataclasses.asdict(cfg)
    tags = _OBJECTIVE_TAGS.get(cfg.loss, {cfg.loss.upper()})
    for name, h in flags.field_help(Config).items():
        prefix = h.split(":")[0] if ":" in h[:30] else ""          # "IFT", "DPO/IPO/KTO reference", "demo only"
        objectives = {w.upper() for w in prefix.removesuffix(" reference").split("/")} if prefix else set()
        if (objectives & _OBJECTIVE_NAMES and not objectives & tags) \
                or (prefix == "pairs" and cfg.loss not in PAIRWISE) or (prefix == "demo only" and cfg.data) \
                or (name in _ONPOLICY_FIELDS and not cfg.onpolicy_every):
            out.pop(name, None)
    if "wandb" not in cfg.log_to:
        out.pop("wandb_project")
    out.update(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
               hidden_dim=args.hidden_dim, vocab_size=args.vocab_size)
    return out


def build_model(cfg, tok, device, fsdp_bf16=None):
    """fsdp_bf16 not None (FSDP2 with --init_from): loaded already sharded, each rank reading only its part
    of the files (hf_io.load_model_sharded), so no rank ever holds the whole fp32 model."""
    if cfg.init_from and fsdp_bf16 is not None:
        model = hf_io.load_model_sharded(cfg.init_from, device, fsdp_bf16)
    elif cfg.init_from:
        model = hf_io.load_model(cfg.init_from, dtype=torch.float32, device=device)
    else:
        model = Transformer(model_args(cfg, tok)).init_weights(std=0.02, seed=cfg.seed).to(device)
    if cfg.freeze_input_embeddings and not model.args.tie_word_embeddings:
        model.embed_tokens.weight.requires_grad_(False)  # never trained: keeps DDP from waiting on it
    model.set_activation_checkpointing(cfg.grad_checkpointing)
    return model


def model_args(cfg, tok):
    """The architecture: --init_from's config.json, else a random init's from the config."""
    if cfg.init_from:
        return hf_io.read_config(cfg.init_from)
    return ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                     head_dim=cfg.dim // cfg.n_heads, hidden_dim=cfg.hidden_dim, vocab_size=tok.vocab_size,
                     sliding_window=None, max_position_embeddings=cfg.max_length,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)


def memory_plan(cfg, tok, device, world, distributed, bf16, rank):
    """On a GPU, print the memory plan (infra/memplan.py) and stop here, before the load, a run that cannot fit."""
    a, par = model_args(cfg, tok), cfg.parallel if distributed else "single"
    per_sample = cfg.onpolicy_every and cfg.loss in ("rwr", "reinforce") + onpolicy.PG_LOSSES   # a row per sample
    rows = cfg.micro_batch_size * (cfg.n_samples if per_sample else 1)
    kw = dict(micro_batch_size=rows, seq_len=cfg.max_length, optimizer=cfg.optimizer, bf16=bf16,
              grad_checkpointing=cfg.grad_checkpointing, loss=cfg.loss, impl=memplan.optimizer_impl(cfg.optimizer,
              device.type), weight_decay=cfg.weight_decay, reference=reference.needs_model(cfg))
    p = memplan.plan(a, world, par, **kw)
    if device.type == "cuda":           # a plan per GPU: on a CPU it would only mislead
        if rank == 0:
            print(memplan.format_plan(p))
        why = memplan.does_not_fit(p, torch.cuda.get_device_properties(device).total_memory / memplan.GiB, a, world,
                                   par, **kw)
        if why:
            sys.exit(f"error: {why}")


def make_optimizer(cfg, params, device):
    """AdamW or RMSprop in the step implementation memplan.optimizer_impl picks (torch's CUDA default would
    allocate a copy of the model at every step) and the plan counts."""
    impl = memplan.optimizer_impl(cfg.optimizer, device.type)
    how = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.RMSprop
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **how)


def lr_at(cfg, step, total):
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac)


# ---------------------------------------------------------------------------- the objective
def make_batch(run, examples, idx, split="train"):
    """A collated micro-batch of `examples` and, for DPO/IPO/KTO, its reference log-probs (reference.py)."""
    cfg, device = run.cfg, run.device
    if cfg.loss not in PAIRWISE:
        return data.to_device(data.collate([examples[i] for i in idx], run.tok.pad_id), device), None
    batch = data.to_device(data.pair_batch(examples, idx, run.tok.pad_id, cfg.loss == "kto"), device)
    return batch, run.reference.logps(batch, idx, split, device, run.ctx) if run.reference else None


def compute_loss(cfg, model, batch, ref_logps, lam):
    """(loss, metrics) for one micro-batch; ref_logps [2B] (+ KL rows) for DPO/IPO/KTO."""
    if cfg.loss == "sft":
        return ift.sft_loss(model, batch, token_mean=cfg.sft_token_mean)
    if cfg.loss == "dft":
        return ift.dft_loss(model, batch, token_mean=cfg.sft_token_mean)
    if cfg.loss == "ift":
        return ift.ift_loss(model, batch, lam=lam, gamma=cfg.gamma, kind=cfg.prop_kind, side=cfg.prop_side,
                            norm=cfg.prop_norm, detach_weights=cfg.detach_weights,
                            freeze_input_embeddings=cfg.freeze_input_embeddings)
    if cfg.loss in onpolicy.PG_LOSSES:     # held-out rows (dataset answers, no samples): plain SFT NLL
        return onpolicy.pg_loss(cfg, model, batch, ref_logps) if "advantages" in batch else ift.sft_loss(model, batch)
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


# ---------------------------------------------------------------------------- the run's state
@dataclass
class Run:
    """What a step, an evaluation or a save needs, set once by `setup` (one object instead of argument lists)."""
    cfg: Config
    rank: int
    world: int
    distributed: bool
    device: torch.device
    bf16: bool
    ctx: object                  # autocast (one process, DDP) or nullcontext (FSDP2 casts itself, fp32)
    tok: object
    train_ex: object
    eval_ex: object
    demo_rows: Optional[list]    # the demo's held-out conversations (generation exact match), else None
    model: torch.nn.Module       # wrapped: DDP, or FSDP2's sharded modules
    opt: torch.optim.Optimizer
    reference: Optional[Reference]
    sampler: Optional[onpolicy.Sampler]
    lengths: list                # tokens per training example (the batch plan groups by length)
    steps_per_epoch: int
    total: int
    run_info: dict               # what a checkpoint records of the schedule (a resume must match it)

    def plan(self, epoch, rank=None):
        """plan[step][micro_step]: the example indices of `rank` (default this one) in `epoch`."""
        cfg = self.cfg
        return data.batch_plan(self.lengths, cfg.micro_batch_size, cfg.grad_accum, self.world,
                               self.rank if rank is None else rank, cfg.seed, epoch)


def setup(cfg, rank, gpu, world, distributed) -> Run:
    """Inputs checked, data loaded, model built and wrapped, optimizer, reference and sampler: everything
    before the first step, in an order that matters (see the comments)."""
    device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    fsdp = distributed and cfg.parallel == "fsdp"
    # FSDP2's MixedPrecisionPolicy casts for us; otherwise autocast (weights stay fp32 either way).
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not fsdp else nullcontext()
    torch.manual_seed(cfg.seed)
    if cfg.init_from:   # a run's out_dir means its newest checkpoint
        cfg.init_from = checkpoint.resolve_model(cfg.init_from, verbose=rank == 0)   # every rank: same error
    if not cfg.eval_only:
        check_inputs(cfg, rank)       # before out_dir, a tokenizer or a cache is written
        guard_out_dir(cfg, rank)
    checkpoint.export_dtype(cfg)      # a bad --save_dtype fails now, not at the first save
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")     # TF32 for the fp32 matmuls (fp32 runs, fp32 heads)
    tok, train_ex, eval_ex, demo_rows = load_data(cfg, rank)
    memory_plan(cfg, tok, device, world, distributed, bf16, rank)
    t_load, sharded = time.time(), fsdp and bool(cfg.init_from)
    model = build_model(cfg, tok, device, bf16 if sharded else None)
    lengths = example_lengths(train_ex)
    steps_per_epoch = len(data.batch_plan(lengths, cfg.micro_batch_size, cfg.grad_accum, world, rank, cfg.seed, 0))
    gbs = cfg.micro_batch_size * cfg.grad_accum * world
    if steps_per_epoch == 0 and not cfg.eval_only:
        sys.exit(f"error: {len(train_ex)} examples do not fill one global batch of {gbs}")
    data_fp = reference.data_fingerprint(tok, train_ex)
    run_info = {"data_fingerprint": data_fp, "world_size": world, "global_batch": gbs,
                "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum}
    # The reference is the initial model: copied / keyed before wrapping, computed before any resume.
    ref = Reference.of_initial_model(cfg, model, tok, data_fp, eval_ex, device, bf16, distributed, world)
    params = [p for p in model.parameters() if p.requires_grad]
    model = model if sharded else parallel.wrap(model, cfg.parallel, device, bf16, distributed)
    if rank == 0:       # the load's peak, apart from training's (whose peak counter starts here)
        print(memplan.load_report(time.time() - t_load, device, sharded))
    # Before any forward: FSDP2 leaves the root's parameters unsharded after a no-grad forward, and an
    # optimizer built then would hold those instead of the sharded master weights.
    opt = make_optimizer(cfg, model.parameters() if fsdp else params, device)
    sampler = onpolicy.Sampler(cfg, tok, train_ex, rank, world) if cfg.onpolicy_every and not cfg.eval_only else None
    run = Run(cfg, rank, world, distributed, device, bf16, ctx, tok, train_ex, eval_ex, demo_rows, model, opt, ref,
              sampler, lengths, steps_per_epoch, cfg.max_steps or steps_per_epoch * cfg.epochs, run_info)
    if ref is not None and ref.keys:
        ref.compute_tables(cfg, model, [] if cfg.eval_only else train_ex, eval_ex,
                           [run.plan(0, r) for r in range(world)], tok.pad_id, device, ctx, rank, world)
    return run


def resume(run):
    """The trainer state to start from: out_dir's newest checkpoint with --resume (weights, optimizer, sampler
    and RNG restored; a changed schedule or objective refused), else step 0."""
    cfg, rank = run.cfg, run.rank
    resume_from = checkpoint.latest(cfg.out_dir) if cfg.resume else None
    if cfg.resume and not resume_from and rank == 0:
        print(f"resume: no checkpoint in {cfg.out_dir}: starting a new run")
    if not resume_from:
        return {"step": 0, "epoch": 0, **run.run_info}, None
    state = checkpoint.load(resume_from, run.model, run.opt)
    refuse = (None if cfg.eval_only else checkpoint.schedule_mismatch(state, run.run_info)) or \
        checkpoint.objective_mismatch(state["config"], cfg)
    if refuse:
        sys.exit(f"error: {refuse} ({resume_from})")
    if run.sampler is not None and "sampler" in state:
        run.sampler.load_state_dict(state["sampler"][rank])
    if rank == 0 and not cfg.eval_only:
        print(f"resumed {resume_from}: step {state['step']} of {run.total}")
        for w in checkpoint.resume_warnings(state, cfg, run.run_info["data_fingerprint"]):
            print(f"warning: {w}")
    return state, resume_from


def save(run, state):
    extra = {"sampler": parallel.gather_objects(run.sampler.state_dict())} if run.sampler is not None else {}
    return checkpoint.save(run.cfg, run.model, run.opt, {**state, **extra}, run.tok, run.rank)


# ---------------------------------------------------------------------------- one step
def refresh_samples(run, step):
    """On-policy: new samples from the *current* weights for every prompt of the steps until the next round
    (offline: of the whole run), and for PPO/GRPO the sampling policy's log-probs in the training micro-batches."""
    cfg, model = run.cfg, parallel.unwrap(run.model)
    horizon = run.total if cfg.sampling == "offline" else min(step + cfg.onpolicy_every, run.total)
    plans = {e: run.plan(e) for e in range(step // run.steps_per_epoch, (horizon - 1) // run.steps_per_epoch + 1)}
    micro = [mb for s in range(step, horizon) for mb in plans[s // run.steps_per_epoch][s % run.steps_per_epoch]]
    run.sampler.refresh(model, step, [i for mb in micro for i in mb], run.device, run.ctx)
    if cfg.loss in onpolicy.PG_LOSSES:
        run.sampler.record_old_logps(model, micro, run.device, run.ctx)


def train_step(run, micro_batches, lam):
    """Forward and backward over the step's micro-batches (gradients averaged) and the clipped gradient norm.
    Returns (metrics, grad norm, tokens): running sums kept on the device (float64, the same sums Python floats
    would give), since a float() per metric per micro-step would stall the GPU queue; read at log steps."""
    cfg, model, n = run.cfg, run.model, len(micro_batches)
    metrics, tokens = {}, 0
    for i, idx in enumerate(micro_batches):
        if run.sampler is not None:
            batch, ref = run.sampler.batch(idx, run.reference.model if run.reference else None, run.device, run.ctx)
        else:
            batch, ref = make_batch(run, run.train_ex, idx)
        with parallel.no_sync(model, i == n - 1), run.ctx:
            loss, m = compute_loss(cfg, model, batch, ref, lam)
            if "loss_scale" in batch:      # on-policy micro-batch without a usable pair
                loss = loss * batch["loss_scale"]
            (loss / n).backward()
        tokens = tokens + batch["attention_mask"].sum()
        for key, v in {"loss": loss, **m}.items():
            v = v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)
            metrics[key] = metrics.get(key, 0.0) + v.to(run.device) / n
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return metrics, gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm, tokens


def global_max(values, device) -> list:
    """[the largest rank's value i] for small ints, bools or bool tensors on the device: one tiny all-reduce and
    one host sync, after which all ranks act alike (stop, save)."""
    vals = torch.stack([torch.as_tensor(v, device=device).to(torch.float32).reshape(()) for v in values])
    return [int(v) for v in parallel.all_reduce(vals, dist.ReduceOp.MAX).tolist()]


# ---------------------------------------------------------------------------- the loop
def train(cfg, rank, gpu, world, distributed, stop=None):
    """The run: setup, then per optimizer step the learning rate and lambda, a sampling round when due, the
    micro-batches (train_step), one all-reduce that agrees on NaN / a signal / a timed save, the update, the log
    line, held-out eval and checkpoints; at the end a checkpoint and the final evaluation."""
    run = setup(cfg, rank, gpu, world, distributed)
    state, resume_from = resume(run)
    if cfg.eval_only:
        return evaluate_only(run, resume_from or cfg.init_from or "random init")
    if state["step"] >= run.total:
        if rank == 0:
            print(f"{resume_from} is the end of this run (step {state['step']} of {run.total}): nothing to train")
        return {"checkpoint": resume_from, "step": state["step"], "finished": True}
    print_start(run)
    log, plans = Log(run, state["step"]), {}
    stop = stop or interrupt.StopRequest()
    stop.armed, last_save = True, time.time()     # a signal from here on finishes the step and saves
    run.model.train()
    while state["step"] < run.total:
        step, t0 = state["step"], time.time()
        epoch, k = divmod(step, run.steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: run.plan(epoch)}
        lr = lr_at(cfg, step, run.total)
        for g in run.opt.param_groups:
            g["lr"] = lr
        lam = ift.lambda_schedule(step, lam=cfg.lam, warmup_steps=cfg.lam_warmup_steps, min_lambda=cfg.min_lambda,
                                  max_lambda=cfg.lam, noise_std=cfg.lam_noise_std, seed=cfg.seed)
        if run.sampler is not None and run.sampler.due(step):
            refresh_samples(run, step)
        metrics, gnorm, tokens = train_step(run, plans[epoch][k], lam)
        # One rank's NaN must stop every rank, or the others wait in the next collective until the timeout;
        # a signal on any rank, or rank 0's clock, makes every rank save after this step (one all-reduce).
        save_due = rank == 0 and cfg.save_every_min > 0 and time.time() - last_save >= 60 * cfg.save_every_min
        bad, stopping, save_due = global_max([~(torch.isfinite(metrics["loss"]) & torch.isfinite(gnorm)),
                                              stop.signum or 0, save_due], run.device)
        if bad:
            raise SystemExit(f"error: non-finite loss or grad norm at step {step} (rank {rank}: loss "
                             f"{float(metrics['loss'])}, grad norm {float(gnorm)}); stopping without saving. "
                             f"Last good checkpoint: {checkpoint.latest(cfg.out_dir) or 'none'}")
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        state = {"step": step + 1, "epoch": (step + 1) // run.steps_per_epoch, **run.run_info}
        log.step(state["step"], lr, lam, metrics, gnorm, tokens, time.time() - t0)
        if cfg.eval_every and state["step"] % cfg.eval_every == 0:
            log.eval(state["step"], evaluate(run))
        periodic = cfg.save_every and state["step"] % cfg.save_every == 0
        if state["step"] < run.total and (periodic or save_due or stopping):
            path, last_save = save(run, state), time.time()
            if stopping:
                log.close()
                return {"checkpoint": path, "step": state["step"], "total": run.total,
                        "exit_code": interrupt.EXIT_CODES[stopping], "interrupted": interrupt.signal_name(stopping)}
    log.close()
    summary = {"final_train_loss": log.last.get("loss"), "tok_s": log.last.get("tok_s"), "checkpoint": save(run, state)}
    summary.update(final_eval(run))
    if rank == 0:
        print(json.dumps(summary))
        plot_curve(log.path)
    return summary


# ---------------------------------------------------------------------------- logging and evaluation
def print_start(run):
    """The config that applies and the run's shape, once, before the first step."""
    cfg = run.cfg
    if run.rank == 0:
        print(json.dumps(shown_config(cfg, parallel.unwrap(run.model).args)))
        gbs = run.run_info["global_batch"]
        mode = cfg.parallel if run.distributed else "single process"
        print(f"world {run.world} ({mode}) | global batch {gbs} | ~{gbs * sum(run.lengths) / len(run.lengths):.0f} "
              f"tokens/step | data {run.run_info['data_fingerprint']} | {run.steps_per_epoch} steps/epoch | "
              f"{run.total} steps | {parallel.unwrap(run.model).num_params() / 1e6:.2f}M params | device {run.device} | "
              f"bf16 {run.bf16}")


class Log:
    """metrics.jsonl and --log_to's loggers (rank 0), the progress bar (or a plain line every log_every steps in a
    redirected log), tokens/s and MFU over the training time since the last log line."""

    def __init__(self, run, step):
        from tqdm import tqdm
        self.run, self.path = run, os.path.join(run.cfg.out_dir, "metrics.jsonl")
        self.show_bar = run.rank == 0 and run.cfg.progress and sys.stderr.isatty()
        self.bar = tqdm(total=run.total, initial=step, disable=not self.show_bar, dynamic_ncols=True)
        if run.rank == 0:
            start_metrics(self.path, step)
        self.live = loggers.Loggers(run.cfg, run.rank, step)
        self.t_start, self.tokens, self.busy, self.last = time.time(), 0, 0.0, {}
        self.peak = memplan.peak_flops(run.device, run.bf16)
        self.flops_tok = memplan.flops_per_token(parallel.unwrap(run.model), run.cfg.max_length, run.cfg)

    def step(self, step, lr, lam, metrics, gnorm, tokens, seconds):
        """After each optimizer step; at log steps every rank joins one reduce: the global mean of the metrics,
        not rank 0's share, and every rank's real token count (rows differ in length)."""
        run = self.run
        self.busy, self.tokens = self.busy + seconds, self.tokens + tokens
        self.bar.update(1)
        if step % run.cfg.log_every and step != run.total:
            return
        vals = parallel.all_reduce(torch.stack(list(metrics.values()) + [self.tokens.double()]))
        metrics, tokens, self.tokens = dict(zip(metrics, (vals[:-1] / run.world).tolist())), float(vals[-1]), 0
        if run.rank == 0:
            self.write(step, lr, lam, metrics, gnorm, tokens)

    def write(self, step, lr, lam, metrics, gnorm, tokens):
        run, dt = self.run, max(self.busy, 1e-9)
        rec = {"step": step, "lr": lr, **({"lam": lam} if run.cfg.loss == "ift" else {}), "grad_norm": float(gnorm),
               "tok_s": tokens / dt, **metrics}
        mfu = memplan.mfu(self.flops_tok, tokens, dt, self.peak, run.world)
        if mfu is not None:
            rec["mfu"] = mfu
        if run.device.type == "cuda":
            rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if run.sampler is not None:
            rec.update(run.sampler.stats)
        self.record(rec)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}",
                             **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))
        if not self.show_bar:
            print(f"step {step}/{run.total} | loss {rec['loss']:.4f} | lr {lr:.2e} | {tokens / dt:.0f} tok/s"
                  + (f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else "") + f" | {time.time() - self.t_start:.0f} s",
                  flush=True)
        self.last, self.busy = rec, 0.0

    def eval(self, step, ev):
        if self.run.rank == 0 and ev:
            (self.bar.write if self.show_bar else print)(f"step {step} | " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            self.record({"step": step, **ev})

    def record(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.live.log(rec)

    def close(self):
        self.bar.close()
        self.live.close()


@torch.no_grad()
def evaluate(run):
    """Held-out loss and metrics, batches sharded over ranks, reduced globally (weighted by rows)."""
    cfg, examples, device = run.cfg, run.eval_ex, run.device
    batches = reference.eval_batches(len(examples), cfg.micro_batch_size, run.rank, run.world, cfg.loss == "kto")
    if not batches:
        return {}
    run.model.eval()
    keys, tot = None, None
    for idx in batches:
        real = idx is not None
        idx = idx if real else list(range(min(cfg.micro_batch_size, len(examples))))  # a dummy: same forwards
        batch, r = make_batch(run, examples, idx, "eval")
        with run.ctx:
            loss, m = compute_loss(cfg, run.model, batch, r, cfg.lam)
        vals = {"loss": loss, **m}
        keys = keys or list(vals)
        v = torch.stack([torch.as_tensor(vals[k], device=device).detach().double().reshape(()) for k in keys])
        tot = (tot if tot is not None else torch.zeros(len(keys) + 1, dtype=torch.float64, device=device))
        tot += torch.cat([v * len(idx), v.new_tensor([len(idx)])]) * real
    run.model.train()
    tot = parallel.all_reduce(tot)
    return {f"eval/{k}": float(x) for k, x in zip(keys, tot[:-1] / tot[-1].clamp(min=1))}


@torch.no_grad()
def generation_exact_match(model, tok, rows, n, device, ctx=nullcontext(), rank=0, world=1):
    """Held-out exact match on the demo task: greedy answers scored by data.check_answer, prompts sharded
    over ranks (under FSDP2 gathered once, parallel.gathered: ranks need not make equally many calls)."""
    rows = rows[:n]
    chunks = [rows[i:i + 32] for i in range(0, len(rows), 32)]
    model.eval()
    hits, example = torch.zeros(2, dtype=torch.float64, device=device), ""
    with parallel.gathered(model):
        for part in chunks[rank::world]:
            prompts = [tokenizer.render_chat(tok, r["messages"][:-1], add_generation_prompt=True)[0] for r in part]
            with ctx:
                outs = generate(model, prompts, 48, stop_ids=[tok.eos_id])
            hits += torch.tensor([sum(data.check_answer(r, tok.decode(o)) for r, o in zip(part, outs)), len(part)],
                                 dtype=torch.float64, device=device)
            example = example or tok.decode(outs[0])
    model.train()
    hits = parallel.all_reduce(hits)
    return float(hits[0] / hits[1].clamp(min=1)), example


def final_eval(run):
    """Held-out metrics, and on the demo task the generation exact match: the end of a run and --eval_only."""
    out = evaluate(run)
    if run.demo_rows is not None and run.cfg.gen_eval:
        em, example = generation_exact_match(parallel.unwrap(run.model), run.tok, run.demo_rows, run.cfg.gen_eval,
                                             run.device, run.ctx, run.rank, run.world)
        out["heldout_exact_match"] = em
        if run.rank == 0:
            print(f"held-out generation exact match: {em:.3f} on {min(run.cfg.gen_eval, len(run.demo_rows))} "
                  f"prompts (e.g. {example!r})")
    return out


def evaluate_only(run, what):
    """--eval_only: the held-out figures of `what` (init_from, or out_dir's newest checkpoint with --resume,
    then exactly those of the run's own final evaluation); writes nothing (no checkpoint, metrics or cache)."""
    summary = {"evaluated": what, **final_eval(run)}
    if run.rank == 0:
        print(json.dumps(summary))
    return summary


def guard_out_dir(cfg, rank):
    """A new run never mixes with an old one: into an out_dir holding checkpoints it needs --resume (continue
    that run) or --overwrite (its checkpoints, metrics and trained tokenizer are removed first)."""
    found = checkpoint.latest(cfg.out_dir)
    if found and not cfg.resume:
        if not cfg.overwrite:
            sys.exit(f"error: {cfg.out_dir} already holds a run (newest checkpoint {found}): pass --resume to "
                     f"continue it, --overwrite to replace it, or choose another --out_dir")
        if rank == 0:
            checkpoint.clear_run(cfg.out_dir)
            print(f"--overwrite: removed the previous run's checkpoints and metrics from {cfg.out_dir}")
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
    parallel.barrier()


def _record_step(line):
    """The step of one metrics.jsonl line; a torn last line (a kill mid-write) counts as after any step."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else float("inf")
    except json.JSONDecodeError:
        return float("inf")


def start_metrics(path, step):
    """metrics.jsonl of this run only: empty for a new run; on resume, the records up to the resumed step
    (what the killed run logged after its last checkpoint is replayed, not duplicated)."""
    keep = []
    if step and os.path.isfile(path):
        with open(path) as f:
            keep = [l for l in f if _record_step(l) <= step]
    atomic.write_text(path, "".join(keep))


def plot_curve(metrics_path):
    """metrics.png: train loss, and held-out loss where it was measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no metrics.png (pip install matplotlib for the loss curve)")
        return
    recs = [json.loads(l) for l in open(metrics_path)] if os.path.isfile(metrics_path) else []
    train_recs, eval_recs = [r for r in recs if "loss" in r], [r for r in recs if "eval/loss" in r]
    if train_recs:
        plt.figure(figsize=(6, 4))
        plt.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], label="train loss")
        if eval_recs:
            plt.plot([r["step"] for r in eval_recs], [r["eval/loss"] for r in eval_recs], "o-", label="held-out loss")
        plt.xlabel("step"), plt.ylabel("loss"), plt.legend()
        plt.savefig(metrics_path.replace(".jsonl", ".png"), dpi=100)
        plt.close()


# ---------------------------------------------------------------------------- entry points
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, gpu, world, distributed = parallel.setup(cfg.dist_timeout_s)
    with interrupt.StopRequest(verbose=rank == 0) as stop:
        out = train(cfg, rank, gpu, world, distributed, stop)
    # Only after a clean finish (a rank that failed may have left the others inside a collective, where a
    # destroy would hang: torchrun ends the job instead), and all ranks together, so none tears down its
    # connections while another still writes or reads.
    parallel.shutdown()
    if out.get("interrupted"):
        stopped(out, rank, sys.argv[1:] if argv is None else argv)
    return out


def stopped(out, rank, argv):
    """After a SIGINT/SIGTERM save: where the run stands, how to continue it, and the signal's exit code."""
    script = sys.argv[0] if sys.argv[0].endswith("train.py") else "train.py"
    if rank == 0:
        print(f"{out['interrupted']}: stopped after step {out['step']} of {out['total']}, saved {out['checkpoint']}\n"
              f"resume with: {interrupt.resume_command(argv, script)}", file=sys.stderr, flush=True)
    sys.exit(out["exit_code"])


def cli(argv):
    """The command line: --dry_run, else main(). The project's user errors, bad data (file:line, field)
    or a checkpoint that does not fit, end the run with one line on stderr and exit code 2 (--debug: the
    traceback instead); anything else is a bug and keeps its traceback."""
    debug, argv = "--debug" in argv, [a for a in argv if a != "--debug"]
    try:
        cfg = parse_config(argv)
        return dry_run(cfg) if cfg.dry_run else main(argv)
    except (data.DataError, CheckpointError) as e:
        if debug:
            raise
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:       # sys.exit("error: ...") is a user error too: the same exit code
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    except KeyboardInterrupt:     # before the first optimizer step (then a signal only stops the loop)
        if debug:
            raise
        print("interrupted before the first optimizer step: nothing to save", file=sys.stderr)
        sys.exit(130)             # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    cli(sys.argv[1:])
