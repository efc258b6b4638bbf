"""
The reference policy of DPO / IPO / KTO (and of PPO/GRPO's KL term): the initial model, behind one object.
It takes one of two forms:
  tables  --ref=precompute (offline): every example's summed log-probs, computed once and cached on disk,
          so training holds one model only;
  model   --ref=online, and every on-policy run (fresh samples need a live reference): a frozen copy.

Two things make cached values equal to what a frozen reference would give *inside* the training step:
- the same precision: they are computed by the wrapped policy itself (FSDP2's bf16 parameters, or the
  same autocast context), never by an fp32 copy next to a bf16 policy, which would bias every margin;
- the same batches: each rank computes its own micro-batches of the first epoch exactly as training will
  see them (same rows, same padding), so at step 0 policy and reference agree bit for bit (margin 0,
  DPO loss ln 2). Rows that epoch never visits are spread over the ranks; every rank runs the same number
  of forwards (FSDP2's all-gathers), and one sum over ranks fills the table.
"""
import copy
import hashlib
import json
import os
import sys

import numpy as np
import torch

import data
import ift
import onpolicy
from infra import atomic, hf_io, parallel

NEEDS_REF = ("dpo", "ipo", "kto")


def needs_model(cfg) -> bool:
    """A frozen copy: --ref=online, or on-policy DPO/IPO/KTO, or PPO/GRPO with a KL term."""
    pg_kl = cfg.loss in onpolicy.PG_LOSSES and cfg.kl_coef > 0
    return (cfg.loss in NEEDS_REF or pg_kl) and not cfg.reference_free and (cfg.ref == "online" or bool(cfg.onpolicy_every))


def needs_tables(cfg) -> bool:
    return cfg.loss in NEEDS_REF and not cfg.reference_free and cfg.ref == "precompute" and not cfg.onpolicy_every


class Reference:
    """model: the frozen copy (or None); tables: {"train", "eval"} -> [N, 3] summed log-probs (chosen, rejected,
    KTO's KL row) or None; keys: the tables' cache keys."""

    def __init__(self, model=None, keys=None):
        self.model, self.keys, self.tables = model, keys, {"train": None, "eval": None}

    @classmethod
    def of_initial_model(cls, cfg, model, tok, data_fp, eval_ex, device, bf16, distributed, world):
        """Before the policy is wrapped: its frozen copy, or the cache keys of its tables (from these initial
        weights), or None when the objective needs no reference."""
        fsdp = distributed and cfg.parallel == "fsdp"
        if needs_model(cfg):
            return cls(model=frozen_copy(cfg, model, device, bf16, fsdp))
        if needs_tables(cfg):
            mode = f"{'bf16' if bf16 else 'fp32'}-{cfg.parallel if distributed else 'single'}"
            train_key = f"{mode}-mb{cfg.micro_batch_size}-acc{cfg.grad_accum}-seed{cfg.seed}-world{world}"
            return cls(keys={"train": fingerprint(cfg, data_fp, model, train_key),
                             "eval": fingerprint(cfg, data_fingerprint(tok, eval_ex), model,
                                                 f"{mode}-mb{cfg.micro_batch_size}-world{world}")})
        return None

    def compute_tables(self, cfg, model, train_ex, eval_ex, plans0, pad_id, device, ctx, rank, world):
        """The tables, computed by the wrapped policy before any step (read from out_dir's cache when there;
        --eval_only neither reads nor writes the cache). plans0: every rank's first-epoch batch plan."""
        kto, mbs = cfg.loss == "kto", cfg.micro_batch_size
        for split, ex, batches in (("train", train_ex, train_batches(plans0[rank], plans0, len(train_ex), mbs, rank, world)),
                                   ("eval", eval_ex, eval_batches(len(eval_ex), mbs, rank, world, kto))):
            path = None if cfg.eval_only else os.path.join(cfg.out_dir, f"ref_logps-{cfg.loss}-{self.keys[split]}.pt")
            self.tables[split] = precompute(parallel.unwrap(model), ex, batches, pad_id, kto, device, ctx, path, rank,
                                            world, cfg.progress) if ex else None

    def logps(self, batch, idx, split, device, ctx):
        """The reference's summed log-probs of a pair micro-batch: [2B] chosen then rejected (+ KTO's B KL rows)."""
        table = self.tables[split]
        if table is not None:
            return torch.cat([table[idx, 0], table[idx, 1]] + ([table[idx, 2]] if "kl" in batch else [])).to(device)
        if self.model is not None:
            with ctx:        # the policy's compute context: margins start at 0 exactly
                return reference_logps(self.model, batch)
        return None


def frozen_copy(cfg, model, device, bf16, fsdp):
    """The initial model, frozen. Under FSDP2 it is sharded like the policy, so it computes exactly as the
    policy does (bf16 parameters); elsewhere it runs in the policy's autocast context (Reference.logps)."""
    if fsdp and cfg.init_from:    # the policy was loaded sharded: load the reference the same way
        return hf_io.load_model_sharded(cfg.init_from, device, bf16).eval().requires_grad_(False)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return parallel.wrap(ref, "fsdp", device, bf16, True) if fsdp else ref


@torch.no_grad()
def reference_logps(ref_model, batch):
    """Summed log-probs of chosen, rejected (and KTO's KL rows) under the reference model."""
    s, _ = ift.seq_logps(ref_model, batch)
    return torch.cat([s, ift.seq_logps(ref_model, batch["kl"])[0]]) if "kl" in batch else s


def precompute(model, examples, batches, pad_id, kto, device, ctx, path, rank, world, progress=True):
    """[N, 3] table (chosen, rejected, KTO KL row) of summed reference log-probs, read from `path` if cached
    there (path None: computed, never cached). `batches`: this rank's lists of example indices (None = a dummy
    forward that keeps the ranks in step). Rank 0 writes the cache."""
    # Rank 0's view decides (a shared filesystem may show the file to some ranks only; ranks that skipped
    # the forwards would leave the others alone in FSDP2's all-gathers), and rank 0 reads it for everyone.
    if path is not None and parallel.broadcast_object(os.path.isfile(path)):
        return parallel.broadcast_object(torch.load(path, weights_only=True) if rank == 0 else None)
    from tqdm import tqdm
    out = torch.zeros(len(examples), 3, device=device)
    was_training = model.training
    model.eval()
    for c in tqdm(batches, desc="reference log-probs", disable=rank != 0 or not progress or not sys.stderr.isatty(),
                  leave=False):
        b = data.to_device(data.pair_batch(examples, c if c is not None else [0], pad_id, kto), device)
        with ctx:
            r = reference_logps(model, b).float()
        if c is None:
            continue
        n = len(c)
        idx = torch.tensor(c, device=device)
        out[idx, 0], out[idx, 1] = r[:n], r[n:2 * n]
        if kto:
            out[idx, 2] = r[2 * n:]
    model.train(was_training)
    out = parallel.all_reduce(out).cpu()      # each row was filled by exactly one rank: x + 0 = x exactly
    if rank == 0 and path is not None:
        atomic.write_file(path, lambda tmp: torch.save(out, tmp))
    parallel.barrier()
    return out


def train_batches(plan0, all_plans0, n, micro_batch_size, rank, world):
    """This rank's first-epoch micro-batches, then its share of the rows no rank visits in that epoch."""
    mine = [mb for step in plan0 for mb in step]
    seen = {i for p in all_plans0 for step in p for mb in step for i in mb}
    rest = [i for i in range(n) if i not in seen]
    rest_batches = [rest[i:i + micro_batch_size] for i in range(0, len(rest), micro_batch_size)]
    return mine + parallel.even_share(rest_batches, rank, world)


def eval_batches(n, micro_batch_size, rank, world, kto=False):
    """The held-out batches exactly as `train.evaluate` shards them (KTO skips single-row batches)."""
    chunks = [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    if kto:
        chunks = [c for c in chunks if len(c) >= 2]
    return parallel.even_share(chunks, rank, world)


def data_fingerprint(tok, examples):
    """sha256 of the tokenizer file and every tokenized example: moves with the data, the template and
    the truncation lengths. Printed at start and stored with every checkpoint."""
    h = hashlib.sha256()
    with open(tok.path, "rb") as f:
        h.update(f.read())
    cached = hasattr(examples, "arrays")      # tokcache.CachedExamples: the same values, without Python lists
    for e in (examples.arrays(i) for i in range(len(examples))) if cached else examples:
        for k in sorted(e):
            h.update(k.encode())
            h.update(np.asarray(e[k], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def fingerprint(cfg, data_fp, model, compute: str = ""):
    """Key of a cached table: the data's fingerprint, the objective (KTO adds KL rows), the compute
    precision/wrapping (`compute`, e.g. "bf16-fsdp": an fp32 table would bias a bf16 run) and the reference
    weights themselves (a slice and the sum of every tensor; of every rank's shard when loaded sharded)."""
    h = hashlib.sha256(json.dumps([data_fp, cfg.loss] + ([compute] if compute else [])).encode())
    sharded = False
    for name, p in sorted(model.state_dict().items()):
        if hasattr(p, "to_local"):     # FSDP2 loaded sharded: hash this rank's part, then every rank's hashes
            p, sharded = p.to_local(), True
        flat = p.detach().reshape(-1).float()
        h.update(name.encode())
        h.update(flat[: 1 << 18].cpu().numpy().tobytes())
        h.update(repr(float(flat.sum())).encode())
    if sharded:
        h = hashlib.sha256("".join(parallel.gather_objects(h.hexdigest())).encode())
    return h.hexdigest()[:16]
