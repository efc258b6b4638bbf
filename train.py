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
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import ift
import onpolicy
from model import ModelArgs, Transformer, atomic_dir, write_checkpoint

PAIRWISE = ("dpo", "ipo", "orpo", "simpo", "kto")
NEEDS_REF = ("dpo", "ipo", "kto")


@dataclass
class Config:
    config: str = ""                # optional JSON preset, applied before the command line
    # data: "" = the built-in synthetic task (data.synthetic_task) with its own tokenizer
    data: str = ""
    eval_data: str = ""
    tokenizer: str = ""             # default: <init_from>/tokenizer.model, or trained for the demo
    n_train: int = 4000             # demo only: synthetic examples
    n_eval: int = 200
    max_length: int = 1024
    max_prompt_length: int = 512
    last_turn_only: bool = False
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
    save_every: int = 0             # 0 = only at the end
    keep_last: int = 2
    eval_every: int = 0
    log_every: int = 10
    gen_eval: int = 100             # held-out generation exact match at the end (demo task only)
    progress: bool = True


def parse_config(argv) -> Config:
    cfg, args = Config(), {}
    for a in argv:
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
    for key, allowed in (("loss", ("sft", "ift", "dft") + PAIRWISE + ("rwr", "reinforce")), ("ref", ("precompute", "online")),
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
def setup_distributed():
    """(rank, local_rank, world). One process per GPU; multi-node via torchrun --nnodes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 0, 1
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), local, world


def barrier(world):
    if world > 1:
        dist.barrier()


def load_data(cfg, rank, world):
    """Tokenizer + train/eval examples. The demo trains its own tokenizer (rank 0, then shared)."""
    pairwise = cfg.loss in PAIRWISE
    tok_path = cfg.tokenizer or (os.path.join(cfg.init_from, "tokenizer.model") if cfg.init_from else "")
    if cfg.data:
        if not os.path.isfile(tok_path):
            sys.exit(f"error: tokenizer '{tok_path}' not found (set --tokenizer=PATH/tokenizer.model)")
        tok = data.Tokenizer(tok_path)
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
            barrier(world)
        tok = data.Tokenizer(tok_path)
    load = data.load_pairs if pairwise else data.load_sft
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length) if pairwise else \
        dict(max_length=cfg.max_length, last_turn_only=cfg.last_turn_only)
    train, stats = load(train_src, tok, **kw)
    evals = load(eval_src, tok, **kw)[0] if eval_src is not None else []
    if rank == 0:
        print(f"data: {len(train)} train / {len(evals)} eval examples; {stats}")
    if not train:
        sys.exit("error: no training example left after truncation")
    return tok, train, evals, (eval_src if not cfg.data else None)


def build_model(cfg, tok, device):
    if cfg.init_from:
        model = Transformer.from_pretrained(cfg.init_from, dtype=torch.float32, device=device)
    else:
        args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         head_dim=cfg.dim // cfg.n_heads, hidden_dim=cfg.hidden_dim, vocab_size=tok.vocab_size,
                         sliding_window=None, max_position_embeddings=cfg.max_length,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        model = Transformer(args).init_weights(std=0.02, seed=cfg.seed).to(device)
    if cfg.freeze_input_embeddings and not model.args.tie_word_embeddings:
        model.embed_tokens.weight.requires_grad_(False)  # never trained: keeps DDP from waiting on it
    model.set_activation_checkpointing(cfg.grad_checkpointing)
    return model


def wrap(model, cfg, world, device, bf16):
    if world == 1:
        return model
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # fp32 sharded master weights; bf16 compute and fp32 gradient reduction on GPU.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    return getattr(model, "module", model)


def no_sync(model, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2: a flag, set before every backward
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    return model.no_sync() if not sync and hasattr(model, "no_sync") else nullcontext()


def lr_at(cfg, step, total):
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac)


# ---------------------------------------------------------------------------- losses
def pair_batch(examples, idx, pad_id, kto: bool):
    """Chosen rows, then rejected rows. KTO adds mismatched rows for its KL estimate: prompt i with the
    chosen answer of dataset example i+1 (fixed pairs, so precomputed reference log-probs stay valid)."""
    batch = data.collate_pairs([examples[i] for i in idx], pad_id)
    if kto:
        n = len(examples)
        batch["kl"] = data.collate([{"input_ids": examples[i]["prompt_ids"] + examples[(i + 1) % n]["chosen_ids"],
                                     "labels": [-100] * len(examples[i]["prompt_ids"]) + examples[(i + 1) % n]["chosen_ids"]}
                                    for i in idx], pad_id)
    return batch


def make_batch(cfg, examples, idx, pad_id, device, ref_table=None, ref_model=None):
    """A collated micro-batch and, for DPO/IPO/KTO, its reference log-probs (cached table or live model)."""
    if cfg.loss not in PAIRWISE:
        return data.to_device(data.collate([examples[i] for i in idx], pad_id), device), None
    batch = data.to_device(pair_batch(examples, idx, pad_id, cfg.loss == "kto"), device)
    ref = None
    if ref_table is not None:
        ref = torch.cat([ref_table[idx, 0], ref_table[idx, 1]] + ([ref_table[idx, 2]] if "kl" in batch else []))
        ref = ref.to(device)
    elif ref_model is not None:
        ref = reference_logps(ref_model, batch)
    return batch, ref


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
    if cfg.loss in ("rwr", "reinforce"):
        return onpolicy.weighted_nll_loss(model, batch)
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
    kl_s, _ = ift.seq_logps(model, batch["kl"])
    return ift.kto_loss(torch.cat([s[:B], s[B:]]), torch.cat([rc, rr]),
                        torch.arange(2 * B, device=s.device) < B, kl_s, ref_logps[2 * B:], beta=cfg.beta)


@torch.no_grad()
def reference_logps(ref_model, batch):
    """Summed log-probs of chosen, rejected (and KTO's KL rows) under the reference model."""
    s, _ = ift.seq_logps(ref_model, batch)
    return torch.cat([s, ift.seq_logps(ref_model, batch["kl"])[0]]) if "kl" in batch else s


def precompute_reference(cfg, model, examples, pad_id, device, fingerprint, rank):
    """Reference log-probs for every example, computed once with the initial model (= the
    reference) and cached on disk under a fingerprint of data, tokenizer, template and model."""
    path = os.path.join(cfg.out_dir, f"ref_logps-{cfg.loss}-{fingerprint}.pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    out = torch.zeros(len(examples), 3)
    model.eval()
    for i in range(0, len(examples), 32):
        c = list(range(i, min(i + 32, len(examples))))
        r = reference_logps(model, data.to_device(pair_batch(examples, c, pad_id, cfg.loss == "kto"), device)).float().cpu()
        out[c, 0], out[c, 1] = r[:len(c)], r[len(c):2 * len(c)]
        if r.numel() > 2 * len(c):
            out[c, 2] = r[2 * len(c):]
    model.train()
    if rank == 0:
        tmp = path + ".tmp"
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


def data_fingerprint(tok, examples):
    """sha256 of the tokenizer file and every tokenized example: moves with the data, the template and
    the truncation lengths. Printed at start and stored with every checkpoint."""
    import numpy as np
    h = hashlib.sha256()
    with open(tok.path, "rb") as f:
        h.update(f.read())
    for e in examples:
        for k in sorted(e):
            h.update(k.encode())
            h.update(np.asarray(e[k], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def fingerprint(cfg, data_fp, model):
    """Key of the cached reference log-probs: the data's fingerprint, the objective (KTO adds KL rows) and
    the reference weights themselves (a slice and the sum of every tensor)."""
    h = hashlib.sha256(json.dumps([data_fp, cfg.loss]).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1).float()
        h.update(name.encode())
        h.update(flat[: 1 << 18].cpu().numpy().tobytes())
        h.update(repr(float(flat.sum())).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- checkpoints
def list_checkpoints(out_dir):
    return sorted(p for p in glob.glob(os.path.join(out_dir, "ckpt-*"))
                  if os.path.isfile(os.path.join(p, "trainer_state.pt")))


def save_checkpoint(cfg, model, opt, state, tok, rank, world):
    """HF-layout model + tokenizer + trainer state, written to a temp dir and renamed. All ranks
    take part in gathering (FSDP2); rank 0 alone writes (one writer per job, also multi-node)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)
    path = os.path.join(cfg.out_dir, f"ckpt-{state['step']:06d}")
    if rank == 0:
        def write(tmp):
            write_checkpoint(tmp, unwrap(model).args, msd, extra_files={"tokenizer.model": tok.path})
            torch.save({"optimizer": osd, "config": dataclasses.asdict(cfg), "rng": torch.get_rng_state(), **state},
                       os.path.join(tmp, "trainer_state.pt"))
        atomic_dir(path, write)
        for old in list_checkpoints(cfg.out_dir)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return path


def load_checkpoint(path, model, opt):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    sd = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        sd.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
    if unwrap(model).args.tie_word_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, sd, options=o)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=o)
    torch.set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(cfg, model, examples, pad_id, device, ctx, ref_table, ref_model):
    if not examples:
        return {}
    model.eval()
    tot, n = {}, 0
    for i in range(0, len(examples), cfg.micro_batch_size):
        idx = list(range(i, min(i + cfg.micro_batch_size, len(examples))))
        if cfg.loss == "kto" and len(idx) < 2:
            continue
        batch, r = make_batch(cfg, examples, idx, pad_id, device, ref_table, ref_model)
        with ctx:
            loss, m = compute_loss(cfg, model, batch, r, cfg.lam)
        for k, v in {"loss": loss, **m}.items():
            tot[k] = tot.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * len(idx)
        n += len(idx)
    model.train()
    return {f"eval/{k}": v / max(n, 1) for k, v in tot.items()}


@torch.no_grad()
def generation_exact_match(model, tok, rows, n, device):
    """Held-out exact match on the demo task: greedy answers scored by data.check_answer."""
    rows = rows[:n]
    prompts = [data.render_chat(tok, r["messages"][:-1], add_generation_prompt=True)[0] for r in rows]
    model.eval()
    outs = []
    for i in range(0, len(prompts), 32):
        outs += model.generate(prompts[i:i + 32], 48, stop_ids=[tok.eos_id])
    model.train()
    scores = [data.check_answer(r, tok.decode(o)) for r, o in zip(rows, outs)]
    return sum(scores) / max(1, len(scores)), tok.decode(outs[0]) if outs else ""


# ---------------------------------------------------------------------------- the loop
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, local, world = setup_distributed()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    # FSDP2's MixedPrecisionPolicy casts for us; otherwise autocast (weights stay fp32 either way).
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not (world > 1 and cfg.parallel == "fsdp") \
        else nullcontext()
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    tok, train_ex, eval_ex, demo_eval_rows = load_data(cfg, rank, world)
    model = build_model(cfg, tok, device)
    data_fp = data_fingerprint(tok, train_ex)

    ref_table, eval_ref_table, ref_model = None, None, None
    if cfg.loss in NEEDS_REF and not cfg.reference_free:
        if cfg.ref == "precompute" and not cfg.onpolicy_every:  # fresh samples need a live reference
            ref_table, eval_ref_table = (
                precompute_reference(cfg, model, ex, tok.pad_id, device,
                                     fingerprint(cfg, data_fingerprint(tok, ex), model), rank) if ex else None
                for ex in (train_ex, eval_ex))
        else:
            import copy
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    lengths = [len(e["input_ids"]) if "input_ids" in e else len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"]))
               for e in train_ex]
    plan_of = lambda epoch: data.batch_plan(lengths, cfg.micro_batch_size, cfg.grad_accum, world, rank, cfg.seed, epoch)
    steps_per_epoch = len(plan_of(0))
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(train_ex)} examples do not fill one global batch of "
                 f"{cfg.micro_batch_size * cfg.grad_accum * world}")
    total = cfg.max_steps or steps_per_epoch * cfg.epochs

    params = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.RMSprop
    gbs = cfg.micro_batch_size * cfg.grad_accum * world
    run_info = {"data_fingerprint": data_fp, "world_size": world, "global_batch": gbs}
    state = {"step": 0, "epoch": 0, **run_info}
    model = wrap(model, cfg, world, device, bf16)
    opt = opt_cls(model.parameters() if world > 1 and cfg.parallel == "fsdp" else params, lr=cfg.lr,
                  weight_decay=cfg.weight_decay)
    ckpts = list_checkpoints(cfg.out_dir) if cfg.resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], model, opt)
        if rank == 0:
            print(f"resumed from {ckpts[-1]} at step {state['step']}")
            if state.get("data_fingerprint") != data_fp:
                print(f"warning: the data differ from the checkpoint's (fingerprint {data_fp} vs "
                      f"{state.get('data_fingerprint')}): the resumed run will not replay the same batches")
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg)))
        tokens_per_step = gbs * sum(lengths) / len(lengths)
        print(f"world {world} | global batch {gbs} | ~{tokens_per_step:.0f} tokens/step | data {data_fp} | "
              f"{steps_per_epoch} steps/epoch | {total} steps | "
              f"{unwrap(model).num_params() / 1e6:.2f}M params | device {device} | bf16 {bf16}")
    sampler = onpolicy.Sampler(cfg, tok, train_ex, rank, world) if cfg.onpolicy_every else None

    from tqdm import tqdm
    bar = tqdm(total=total, initial=state["step"], disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    t0, tokens, last_log, plan_epoch = time.time(), 0, {}, None
    model.train()
    while state["step"] < total:
        step = state["step"]
        epoch, k = divmod(step, steps_per_epoch)
        if plan_epoch != epoch:
            plan, plan_epoch = plan_of(epoch), epoch
        lr = lr_at(cfg, step, total)
        for g in opt.param_groups:
            g["lr"] = lr
        lam = ift.lambda_schedule(step, lam=cfg.lam, warmup_steps=cfg.lam_warmup_steps, min_lambda=cfg.min_lambda,
                                  max_lambda=cfg.lam, noise_std=cfg.lam_noise_std, seed=cfg.seed)
        if sampler is not None and (not sampler.samples or cfg.sampling == "onpolicy" and step % cfg.onpolicy_every == 0):
            horizon = total if cfg.sampling == "offline" else min(step + cfg.onpolicy_every, total)
            upcoming = [i for s in range(step, horizon)
                        for mb in plan_of(s // steps_per_epoch)[s % steps_per_epoch] for i in mb]
            sampler.refresh(unwrap(model), step, upcoming, device)   # from the *current* weights
        acc = {}
        for a, idx in enumerate(plan[k]):
            if sampler is not None:
                batch, ref = sampler.batch(idx, a, unwrap(model), ref_model, device)
            else:
                batch, ref = make_batch(cfg, train_ex, idx, tok.pad_id, device, ref_table, ref_model)
            with no_sync(model, a == len(plan[k]) - 1), ctx:
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
        if not (math.isfinite(acc["loss"]) and math.isfinite(float(gnorm))):
            last = list_checkpoints(cfg.out_dir)
            raise SystemExit(f"error: non-finite loss {acc['loss']} / grad norm {float(gnorm)} at step {step}; "
                             f"stopping without saving. Last good checkpoint: {last[-1] if last else 'none'}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = {"step": step + 1, "epoch": (step + 1) // steps_per_epoch, **run_info}
        bar.update(1)
        if state["step"] % cfg.log_every == 0 or state["step"] == total:
            if world > 1:   # log the global mean, not rank 0's share (every rank joins the reduce)
                vals = torch.tensor(list(acc.values()), device=device)
                dist.all_reduce(vals)
                acc = dict(zip(acc, (vals / world).tolist()))
        if rank == 0 and (state["step"] % cfg.log_every == 0 or state["step"] == total):
            dt = time.time() - t0
            rec = {"step": state["step"], "lr": lr, "lam": lam, "grad_norm": float(gnorm), "tok_s": tokens / dt, **acc}
            if device.type == "cuda":
                rec["mfu"] = unwrap(model).flops_per_token(cfg.max_length) * tokens / dt / (989e12 * world)
                rec["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if sampler is not None:
                rec.update(sampler.stats)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{acc['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}",
                            **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))
            last_log = rec
        if cfg.eval_every and state["step"] % cfg.eval_every == 0:
            ev = evaluate(cfg, model, eval_ex, tok.pad_id, device, ctx, eval_ref_table, ref_model)
            if rank == 0 and ev:
                bar.write(" ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": state["step"], **ev}) + "\n")
        if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
            save_checkpoint(cfg, model, opt, state, tok, rank, world)
    bar.close()
    path = save_checkpoint(cfg, model, opt, state, tok, rank, world)
    summary = {"final_train_loss": last_log.get("loss"), "tok_s": last_log.get("tok_s"), "checkpoint": path}
    summary.update(evaluate(cfg, model, eval_ex, tok.pad_id, device, ctx, eval_ref_table, ref_model))
    if demo_eval_rows is not None and cfg.gen_eval and rank == 0:
        em, example = generation_exact_match(unwrap(model), tok, demo_eval_rows, cfg.gen_eval, device)
        summary["heldout_exact_match"] = em
        print(f"held-out generation exact match: {em:.3f} on {min(cfg.gen_eval, len(demo_eval_rows))} "
              f"prompts (e.g. {example!r})")
    if rank == 0:
        print(json.dumps(summary))
        plot_curve(metrics_path)
    if world > 1:
        dist.destroy_process_group()
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


if __name__ == "__main__":
    main()
