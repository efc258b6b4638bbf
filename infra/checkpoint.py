"""
Checkpoints of a training run, `ckpt-XXXXXX/`:
  config.json + model*.safetensors  the Hugging Face export (what `transformers` loads), in --save_dtype
                                    (default: the dtype of the checkpoint the run started from; fp32 for
                                    a random init), plus the tokenizer trained with;
  dcp/                              the resumable state: fp32 master weights + optimizer, written by every
                                    rank as its own shards (torch.distributed.checkpoint), read back the
                                    same way, so no rank ever reads or holds what it does not own;
  trainer_state.pt                  step, data position, RNG, config, sampler (plain tensors and
                                    containers: `torch.load(weights_only=True)` reads it).
All ranks write into one temp dir that rank 0 flushes (fsync) and renames: a run killed while writing
never leaves a half checkpoint that `--resume` would pick. Rank 0 alone chooses what to resume.
Checkpoints of the earlier layout (optimizer inside trainer_state.pt, no dcp/) still resume.
"""
import dataclasses
import glob
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager

import torch

from infra import atomic, parallel
from infra.hf_io import CheckpointError, write_weights

# Values that fix which examples each optimizer step sees; a resume that changes them would silently
# replay other batches on another schedule.
SCHEDULE_KEYS = ("world_size", "micro_batch_size", "grad_accum")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def list_checkpoints(out_dir):
    return sorted(p for p in glob.glob(os.path.join(out_dir, "ckpt-*"))
                  if os.path.isfile(os.path.join(p, "trainer_state.pt")))


def latest(out_dir):
    """The newest complete checkpoint as rank 0 sees it, on every rank (a shared filesystem with caching
    can show ranks different listings; they must all resume from the same step)."""
    found = list_checkpoints(out_dir)
    return parallel.broadcast_object(found[-1] if found else None)


@contextmanager
def _quiet_single_process():
    """torch.distributed.checkpoint warns on every save/load of a single-process run that it assumes one
    process: it does, by design here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def export_dtype(cfg) -> torch.dtype:
    """The HF export's dtype: --save_dtype, else the dtype of --init_from's config.json (Mistral's is
    bf16: an fp32 export would double its size for bits that training at bf16 compute never used), else
    fp32 (a random init)."""
    if cfg.save_dtype:
        if cfg.save_dtype not in ("fp32", "bf16", "fp16"):
            raise CheckpointError(f"--save_dtype={cfg.save_dtype!r} is not one of fp32, bf16, fp16")
        return DTYPES[cfg.save_dtype]
    if not cfg.init_from:
        return torch.float32
    path = os.path.join(cfg.init_from, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError):
        return torch.float32      # build_model reports a bad config.json
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"   # transformers 4.x / 5.x
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def export_state(model, dtype, rank):
    """{name: CPU tensor in `dtype`} on rank 0 ({} elsewhere), gathered one tensor at a time under FSDP2
    (all ranks take part), so rank 0 never holds more than the export itself plus one fp32 tensor."""
    m = parallel.unwrap(model)
    out = {}
    for name, t in m.state_dict().items():
        if m.args.tie_word_embeddings and name == "lm_head.weight":
            continue                              # the same table as embed_tokens.weight
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        if rank == 0:
            out[name] = t.detach().to("cpu", dtype)
    return out


def save(cfg, model, opt, state, tok, rank):
    """All ranks write their shards of the resumable state; rank 0 the export and trainer_state.pt, then
    flushes and renames the temp dir. Returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    path = os.path.abspath(os.path.join(cfg.out_dir, f"ckpt-{state['step']:06d}"))
    export = export_state(model, export_dtype(cfg), rank)
    tmp = parallel.broadcast_object(tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".tmp-{os.path.basename(path)}-")
                                    if rank == 0 else None)
    try:
        with _quiet_single_process():
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=os.path.join(tmp, "dcp"), no_dist=not torch.distributed.is_initialized())
        if rank == 0:
            # the export, with the tokenizer trained with
            write_weights(tmp, parallel.unwrap(model).args, export, extra_files=tok.files())
            torch.save({"config": dataclasses.asdict(cfg), "rng": torch.get_rng_state(), **state},
                       os.path.join(tmp, "trainer_state.pt"))
        parallel.barrier()                        # every rank's shards are on disk
        if rank == 0:
            atomic.swap_into_place(tmp, path)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        # keep_last: this checkpoint and the newest others; never the one just written, whatever its step
        others = [p for p in list_checkpoints(cfg.out_dir) if os.path.abspath(p) != os.path.abspath(path)]
        for old in others[:max(0, len(others) - (cfg.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return path


def load(path, model, opt):
    """Weights, optimizer and RNG into the (possibly wrapped) model; returns the trainer state. Each rank
    reads from dcp/ the shards of what it holds (FSDP2: its part; DDP: all of it, as it holds all of it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = read_trainer_state(os.path.join(path, "trainer_state.pt"))
    impl = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in opt.param_groups]
    if os.path.isdir(os.path.join(path, "dcp")):
        import torch.distributed.checkpoint as dcp
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        with _quiet_single_process():
            dcp.load(sd, checkpoint_id=os.path.join(path, "dcp"), no_dist=not torch.distributed.is_initialized())
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
    else:                                         # the earlier layout: fp32 HF export + full optimizer
        if "optimizer" not in state:
            raise CheckpointError(f"{path}: neither dcp/ nor an optimizer in trainer_state.pt: cannot resume from it")
        from safetensors.torch import load_file
        sd = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            sd.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
        if parallel.unwrap(model).args.tie_word_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        o = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, sd, options=o)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=o)
    keep_step_implementation(opt, impl)
    torch.set_rng_state(state["rng"])
    return state


def keep_step_implementation(opt, impl):
    """Loading an optimizer state dict also loads the saving run's foreach / fused flags; put back the ones
    this run chose (train.make_optimizer: on CUDA a foreach step would need a model's worth more memory)
    and, for the fused step, keep its step counters where it needs them, on the parameters' device."""
    for group, flags in zip(opt.param_groups, impl):
        group.update(flags)
        if group.get("fused"):
            for p in group["params"]:
                st = opt.state.get(p, {})
                if "step" in st:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


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


def schedule_mismatch(saved: dict, now: dict):
    """A one-line reason to refuse a resume whose batch schedule differs, or None."""
    diff = [f"{k} {saved.get(k)} -> {now[k]}" for k in SCHEDULE_KEYS if k in saved and saved[k] != now[k]]
    if not diff:
        return None
    return ("cannot resume: the checkpoint was written with another batch schedule (" + ", ".join(diff) +
            "); resuming would replay other batches. Use the same --nproc_per_node/--micro_batch_size/"
            "--grad_accum, or start a new run in another --out_dir")


def objective_mismatch(saved_cfg: dict, cfg):
    """Another objective is another run: refuse (a one-line reason), or None."""
    if saved_cfg.get("loss", cfg.loss) != cfg.loss:
        return (f"cannot resume: the checkpoint was trained with --loss={saved_cfg['loss']}, this run asks for "
                f"--loss={cfg.loss}; start it with --init_from=<that checkpoint> in another --out_dir")
    return None


# Settings that may differ on resume without a word: where output goes and how it is shown.
QUIET = {"resume", "overwrite", "eval_only", "dry_run", "out_dir", "progress", "log_every", "eval_every", "save_every",
         "save_every_min", "keep_last", "gen_eval", "dist_timeout_s", "config", "log_to", "wandb_project"}


def resume_warnings(state: dict, cfg, data_fp: str) -> list:
    """What a resumed run does differently from the run that wrote the checkpoint (learning rate, steps, ...)."""
    now, saved = dataclasses.asdict(cfg), state.get("config", {})
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
               if k in saved and k not in QUIET and saved[k] != now[k]]
    out = ["resuming with changed settings: " + ", ".join(changed)] if changed else []
    if state.get("data_fingerprint") != data_fp:
        out.append(f"the data differ from the checkpoint's (fingerprint {data_fp} vs {state.get('data_fingerprint')}): "
                   f"the resumed run will not replay the same batches")
    return out


def clear_run(out_dir):
    """--overwrite: remove a previous run's checkpoints, metrics and trained tokenizer (reference-log-prob
    caches stay: they are keyed by what they were computed from)."""
    for p in list_checkpoints(out_dir) + glob.glob(os.path.join(out_dir, "tokenizer-*.model")) + \
            glob.glob(os.path.join(out_dir, "tokenizer-*.vocab")) + \
            [os.path.join(out_dir, f) for f in ("metrics.jsonl", "metrics.png")]:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def resolve_model(path, verbose=True):
    """A checkpoint directory to load: `path` itself (it has a config.json), or the newest complete checkpoint
    of the run directory `path` (e.g. `out`). Anything else is a CheckpointError naming what is missing."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (a checkpoint dir with config.json, or a run's out_dir)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint (no config.json) nor a run directory (no ckpt-*)")
    if verbose:
        print(f"{path} is a run directory: using its newest checkpoint {found[-1]}")
    return found[-1]
