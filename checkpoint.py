"""
Checkpoints of a training run: `ckpt-XXXXXX/` = Hugging Face layout (config.json + model.safetensors,
loadable by `transformers`) + the tokenizer + `trainer_state.pt` (optimizer, step, data position, RNG,
config, sampler; plain tensors and containers, so `torch.load(weights_only=True)` reads it).
Written to a temp dir and renamed: a run killed while writing never leaves a half checkpoint that
`--resume` would pick. Global rank 0 alone chooses what to resume and writes; the others follow.
"""
import dataclasses
import glob
import os
import shutil

import torch

import parallel
from model import atomic_dir, read_trainer_state, write_checkpoint

# Values that fix which examples each optimizer step sees; a resume that changes them would silently
# replay other batches on another schedule.
SCHEDULE_KEYS = ("world_size", "micro_batch_size", "grad_accum")


def list_checkpoints(out_dir):
    return sorted(p for p in glob.glob(os.path.join(out_dir, "ckpt-*"))
                  if os.path.isfile(os.path.join(p, "trainer_state.pt")))


def latest(out_dir):
    """The newest complete checkpoint as rank 0 sees it, on every rank (a shared filesystem with caching
    can show ranks different listings; they must all resume from the same step)."""
    found = list_checkpoints(out_dir)
    return parallel.broadcast_object(found[-1] if found else None)


def save(cfg, model, opt, state, tok, rank):
    """All ranks take part in gathering (FSDP2); rank 0 writes. Returns the checkpoint's path."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
    path = os.path.join(cfg.out_dir, f"ckpt-{state['step']:06d}")
    if rank == 0:
        def write(tmp):
            write_checkpoint(tmp, parallel.unwrap(model).args, msd, extra_files=tok.files())   # the tokenizer trained with
            torch.save({"optimizer": osd, "config": dataclasses.asdict(cfg), "rng": torch.get_rng_state(), **state},
                       os.path.join(tmp, "trainer_state.pt"))
        atomic_dir(path, write)
        # keep_last: this checkpoint and the newest others; never the one just written, whatever its step
        others = [p for p in list_checkpoints(cfg.out_dir) if os.path.abspath(p) != os.path.abspath(path)]
        for old in others[:max(0, len(others) - (cfg.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return path


def load(path, model, opt):
    """Weights, optimizer and RNG into the (possibly wrapped) model; returns the trainer state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    sd = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        sd.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
    if parallel.unwrap(model).args.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    state = read_trainer_state(os.path.join(path, "trainer_state.pt"))
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd, options=o)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=o)
    torch.set_rng_state(state["rng"])
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
         "keep_last", "gen_eval", "dist_timeout_s", "config"}


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


def resolve_model(path):
    """A checkpoint directory to load: `path` itself (it has a config.json), or the newest complete checkpoint
    of the run directory `path` (e.g. `out`). Anything else is a CheckpointError naming what is missing."""
    from model import CheckpointError
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (a checkpoint dir with config.json, or a run's out_dir)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: neither a checkpoint (no config.json) nor a run directory (no ckpt-*)")
    print(f"{path} is a run directory: using its newest checkpoint {found[-1]}")
    return found[-1]
