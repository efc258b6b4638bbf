"""
Tokenized data, once: rank 0 tokenizes a --data source and stores the examples as one flat int32 array
plus offsets (memory-mapped .npy files); every later start, and every rank, maps those files instead of
tokenizing again and holding Python lists (about 48 bytes per token; here 4, shared by the ranks of a node
through the page cache).

The cache key covers what the examples depend on: each data file's path, size and mtime, the row caps
and split, the tokenizer's files, and the loader's options (template conventions, truncation lengths).
Supervised-token labels are stored in the ids' sign: a label is either -100 or the token's own id
(tokenizer.render_chat), so a negative value -(id + 1) is an unsupervised token.
"""
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

import data
import tokenizer
from infra import atomic, parallel

VERSION = 1
FIELDS = {"sft": ("input_ids",), "pairs": ("prompt_ids", "chosen_ids", "rejected_ids")}


def cache_key(src, split, tok, kind, options: dict):
    """16 hex digits naming the cache of one --data value, or None for in-memory rows (the demo)."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    files = []
    for path, cap in data.parse_sources(os.fspath(src)):
        for f in data.source_files(path, split):
            st = os.stat(f)
            files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        files.append(cap)
    h = hashlib.sha256(json.dumps([VERSION, kind, split, files, sorted(options.items())]).encode())
    for name, path in sorted(tok.files().items()):
        with open(path, "rb") as f:
            h.update(name.encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


class CachedExamples(Sequence):
    """A list of examples (dicts of lists of ints, as data.load_sft / load_pairs return) read from the
    mapped arrays on access: only the examples of the current batch ever exist as Python lists."""

    def __init__(self, d):
        self.tokens = np.load(os.path.join(d, "tokens.npy"), mmap_mode="r")
        self.offsets = np.load(os.path.join(d, "offsets.npy"), mmap_mode="r")
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        self.kind, self.stats = meta["kind"], meta["stats"]
        self.fields = FIELDS[self.kind]

    def __len__(self):
        return (len(self.offsets) - 1) // len(self.fields)

    def lengths(self):
        """train.example_lengths of these examples (SFT: the sequence; pairs: prompt + longer answer)."""
        n = np.diff(np.asarray(self.offsets)).reshape(len(self), len(self.fields))
        return (n[:, 0] if self.kind == "sft" else n[:, 0] + n[:, 1:].max(1)).tolist()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {k: v.tolist() for k, v in self.arrays(i).items()}

    def arrays(self, i):
        """Example i as int64 numpy arrays (what reference.data_fingerprint hashes, without Python lists)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        F = len(self.fields)
        o = self.offsets[i * F:(i + 1) * F + 1]
        parts = [np.asarray(self.tokens[o[f]:o[f + 1]], dtype=np.int64) for f in range(F)]
        if self.kind == "sft":
            v = parts[0]
            return {"input_ids": np.where(v < 0, -v - 1, v), "labels": np.where(v < 0, tokenizer.IGNORE, v)}
        return dict(zip(self.fields, parts))


def write(d, kind, examples, stats):
    """The cache directory `d` (temp dir + rename: a run killed while writing leaves no half cache)."""
    fields = FIELDS[kind]
    lengths = [len(e[k]) for e in examples for k in fields]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    j = 0
    for e in examples:
        for k in fields:
            v = np.asarray(e[k], dtype=np.int64)
            if kind == "sft":
                lab = np.asarray(e["labels"], dtype=np.int64)
                if not np.all((lab == v) | (lab == tokenizer.IGNORE)):
                    raise ValueError("a label that is neither -100 nor its token's id: cannot store it in the sign")
                v = np.where(lab == tokenizer.IGNORE, -v - 1, v)
            tokens[j:j + len(v)] = v
            j += len(v)
    def fill(tmp):
        np.save(os.path.join(tmp, "tokens.npy"), tokens)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"version": VERSION, "kind": kind, "stats": stats}, f)
    atomic.write_dir(d, fill)


def load(load_fn, src, tok, cache_dir, rank, progress=True, **kw):
    """(examples, stats) of load_fn(src, tok, **kw) (data.load_sft or data.load_pairs), from the cache
    under `cache_dir` when it holds this source tokenized this way; else rank 0 tokenizes (with a progress
    bar) and writes it, and every rank maps it. cache_dir "" or a source of in-memory rows: no cache."""
    kind = "pairs" if load_fn is data.load_pairs else "sft"
    key = cache_key(src, kw.get("split", ""), tok, kind, {k: v for k, v in kw.items() if k != "split"}) \
        if cache_dir else None
    if key is None:
        return load_fn(src, tok, **kw)
    d = os.path.join(cache_dir, f"{kind}-{key}")
    if not os.path.isdir(d) and rank == 0:
        examples, stats = load_fn(src, tok, progress=progress, **kw)
        write(d, kind, examples, stats)
    parallel.barrier()
    ex = CachedExamples(d)
    return ex, {**ex.stats, "cache": d}
