"""
Hugging Face checkpoint directories: config.json (the three dialects in use: Mistral v0.1, transformers 4.x
and 5.x) and safetensors weights (one file or an index of shards), read whole or as this rank's FSDP2
shard, and written atomically. Module names mirror Hugging Face's (model.py), so a checkpoint key is a
parameter name with "model." in front (except lm_head.weight): no renaming table to get wrong.
"""
import json
import os
import shutil
from typing import Optional

import torch

from infra import atomic
from model import LLAMA3_ROPE_KEYS, ModelArgs, Transformer


class CheckpointError(ValueError):
    """A checkpoint directory that does not match what the model expects."""


# ---------------------------------------------------------------------------- config.json
def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
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
    return ModelArgs(
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


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """transformers-4.x dialect (top-level rope_theta, integer head_dim); 5.x reads it too."""
    arch = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}[args.model_type]
    cfg = {"architectures": [arch], "model_type": args.model_type, "hidden_size": args.dim,
           "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
           "intermediate_size": args.hidden_dim, "vocab_size": args.vocab_size,
           "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "hidden_act": "silu",
           "max_position_embeddings": args.max_position_embeddings,
           "tie_word_embeddings": args.tie_word_embeddings, "bos_token_id": args.bos_token_id,
           "eos_token_id": args.eos_token_id, "attention_dropout": 0.0,
           "torch_dtype": str(dtype).removeprefix("torch.")}
    if args.rope_scaling is not None:
        cfg["rope_scaling"] = dict(args.rope_scaling)
    if args.model_type == "mistral":
        cfg["sliding_window"] = args.sliding_window
    else:
        cfg.update(attention_bias=False, mlp_bias=False)
    return cfg


def read_config(path) -> ModelArgs:
    """ModelArgs of a Hugging Face checkpoint directory, from its config.json."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    return args_from_hf_config(cfg, cfg_path)


# ---------------------------------------------------------------------------- weights
def load_model(path, dtype=None, device=None) -> Transformer:
    """A Transformer from a checkpoint directory. Built on the meta device and filled tensor by tensor with
    assign=True, so a 7B load never holds two copies in RAM."""
    args, dtype, state = read_config(path), dtype or torch.float32, {}
    with torch.device("meta"):
        model = Transformer(args)

    def take(name, tensor_slice, shape):
        state[name] = tensor_slice[:].to(device=device, dtype=dtype)
    read_weights(path, args, {n: p.shape for n, p in model.named_parameters()}, take)
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_model_sharded(path, device, bf16: bool) -> Transformer:
    """An FSDP2 model filled from a checkpoint directory without any rank holding the whole model: built on
    the meta device, sharded, then each rank reads from the safetensors files only the rows of dim 0 it owns
    (FSDP2 shards every tensor like torch.chunk: ceil(n / world) rows per rank), in fp32."""
    import torch.distributed as dist
    from infra import parallel
    args = read_config(path)
    with torch.device("meta"):
        model = Transformer(args)
    parallel.wrap(model, "fsdp", device, bf16, True)
    model.to_empty(device=device)
    params = dict(model.named_parameters())           # a tied table once, as embed_tokens.weight
    rank, world = dist.get_rank(), dist.get_world_size()

    def take(name, tensor_slice, shape):
        p = params[name]
        local = p.to_local() if hasattr(p, "to_local") else p
        rows = -(-shape[0] // world)
        lo, hi = min(rank * rows, shape[0]), min((rank + 1) * rows, shape[0])
        if local.shape[0] != hi - lo:
            raise RuntimeError(f"{name}: FSDP2 gave rank {rank} {local.shape[0]} rows, expected {hi - lo}")
        if hi > lo:
            with torch.no_grad():
                local.copy_(tensor_slice[lo:hi])
    read_weights(path, args, {n: p.shape for n, p in params.items()}, take)
    return model


def read_weights(path, args: ModelArgs, shapes: dict, take):
    """The one checked walk over a checkpoint's tensors: every key the index names is in its file, every
    tensor is a parameter of `shapes` ({name: shape}) with that shape, every parameter is present; each
    is handed to take(name, safetensors_slice, shape). A file is reopened per tensor, so the pages read
    are unmapped again and never add up (a 7B load reads 14-28 GB)."""
    cfg_path, filled = os.path.join(path, "config.json"), set()
    for fname, keys in _weight_files(path).items():
        if keys is None:
            with _open_safetensors(fname) as f:
                keys = sorted(f.keys())
        for key in keys:
            name = key.removeprefix("model.")
            with _open_safetensors(fname) as f:
                if key not in f.keys():
                    raise CheckpointError(f"{fname}: index says it holds '{key}', but it does not")
                if name.endswith("rotary_emb.inv_freq") or (args.tie_word_embeddings and name == "lm_head.weight"):
                    continue  # recomputed / tied: stored copies are redundant
                if name not in shapes:
                    raise CheckpointError(f"{fname}: unexpected key '{key}'")
                tensor_slice = f.get_slice(key)
                shape = tuple(tensor_slice.get_shape())
                if shape != tuple(shapes[name]):
                    raise CheckpointError(f"{fname}: '{key}' has shape {shape}, expected {tuple(shapes[name])} "
                                          f"from {cfg_path}")
                take(name, tensor_slice, shape)
            filled.add(name)
    missing = [n if n == "lm_head.weight" else "model." + n for n in shapes if n not in filled]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def save_model(model, path, state_dict=None, dtype=None, max_shard_bytes: int = 5 * 2**30,
               extra_files: Optional[dict] = None):
    """Write an HF-layout checkpoint of `model` (or of `state_dict` with model's config) to a temp dir
    beside `path`, then rename it into place: a crash never leaves a half-written directory where a good
    one was. extra_files: {name in the checkpoint: source path} (e.g. the tokenizer)."""
    atomic.write_dir(path, lambda tmp: write_weights(tmp, model.args, state_dict or model.state_dict(), dtype,
                                                     max_shard_bytes, extra_files))


def write_weights(out_dir, args: ModelArgs, state_dict, dtype=None, max_shard_bytes=5 * 2**30,
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
        json.dump(hf_config(args, saved_dtype), f, indent=2)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(out_dir, name))


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


def _open_safetensors(fname):
    """safe_open, with a truncated or foreign file reported as a CheckpointError naming it (safetensors
    checks the header against the file size, so a cut-off download fails here, not mid-load)."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(fname, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fname}: not a readable safetensors file ({e}); re-download or re-save it") from None
