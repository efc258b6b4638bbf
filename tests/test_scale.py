"""Memory and start-up at scale, on CPU with 2 gloo ranks: sharded gradients during FSDP2 accumulation,
sharded loading from safetensors, the sharded resumable checkpoint."""
import json
import os
import textwrap

import pytest
import torch

import reference
from infra import hf_io
from test_distributed import GUARD, ROOT, metrics, torchrun  # noqa: F401
from test_train import TINY

# Counts every gradient a rank holds after a micro-step's backward: the sharded .grad (local part of the
# DTensor) and what FSDP2 keeps unsharded between micro-steps when gradient sync is off.
GRAD_BYTES = """
def grad_bytes(model):
    n = 0
    for p in model.parameters():
        if p.grad is not None:
            g = getattr(p.grad, "_local_tensor", p.grad)
            n += g.numel() * g.element_size()
    for m in model.modules():
        group = getattr(m, "_get_fsdp_state", None) and m._get_fsdp_state()._fsdp_param_group
        for fp in (group.fsdp_params if group else []):
            for g in (getattr(fp._unsharded_param, "grad", None) if hasattr(fp, "_unsharded_param") else None,
                      getattr(fp, "unsharded_accumulated_grad", None)):
                if g is not None:
                    n += g.numel() * g.element_size()
    return n
"""


def test_fsdp_accumulation_keeps_gradients_sharded(tmp_path, tok_path):
    script = tmp_path / "grads.py"
    script.write_text(textwrap.dedent(f"""
        import contextlib, json, sys
        sys.path.insert(0, {ROOT!r})
        import train
        from infra import parallel
        """) + GRAD_BYTES + textwrap.dedent(f"""
        seen, inner = [], parallel.no_sync

        @contextlib.contextmanager
        def measured(model, sync):      # wraps the loop's backward: measure right after it
            with inner(model, sync):
                yield
            full = sum(p.numel() * 4 for p in model.parameters())
            seen.append(grad_bytes(model) / full)

        parallel.no_sync = measured
        train.main({TINY!r} + ["--tokenizer={tok_path}", "--loss=ift", "--max_steps=2", "--micro_batch_size=2",
                               "--grad_accum=4", "--parallel=fsdp", "--out_dir={tmp_path / 'out'}"])
        import torch.distributed as dist   # one file per rank: two ranks' prints can share a stdout line
        rank = dist.get_rank() if dist.is_initialized() else int(__import__("os").environ["RANK"])
        open("{tmp_path}/grads-%d.json" % rank, "w").write(json.dumps(seen))
    """))
    torchrun([str(script)])
    fractions = [json.load(open(tmp_path / f"grads-{r}.json")) for r in range(2)]
    assert len(fractions) == 2 and all(len(f) == 8 for f in fractions)    # 2 ranks x 2 steps x 4 micro-steps
    # ~1/2 of one fp32 copy per rank on 2 ranks (FSDP2's "no sync" would hold a whole copy until the last one)
    assert max(max(f) for f in fractions) <= 0.6, fractions
    assert min(min(f) for f in fractions) > 0.3, fractions      # and the count does see the gradients


def test_sharded_load_never_holds_the_whole_model(tmp_path):
    """A 35M-parameter bf16 checkpoint (140 MB in fp32): under FSDP2 each of 2 ranks grows by its half in
    fp32 plus one tensor's slice, not by the whole model; its logits equal a full fp32 load's."""
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, hidden_dim=1536, vocab_size=8000,
                     sliding_window=None)
    ck, warm = str(tmp_path / "ck"), str(tmp_path / "warm")
    hf_io.save_model(Transformer(args).init_weights(seed=0), ck, dtype=torch.bfloat16)
    hf_io.save_model(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                          vocab_size=64)).init_weights(seed=0), warm, dtype=torch.bfloat16)
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {ROOT!r})
        from infra import hf_io, parallel
        rank, _, world, _ = parallel.setup(120)
        hf_io.load_model_sharded({warm!r}, torch.device("cpu"), bf16=False)   # imports, one-time set-up: not the load
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = hf_io.load_model_sharded({ck!r}, torch.device("cpu"), bf16=False)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        full = sum(p.numel() * 4 for p in model.parameters())
        x = torch.arange(64).reshape(2, 32) * 37 % 8000
        with torch.no_grad():
            got = model(x)
        ref = hf_io.load_model({ck!r}, dtype=torch.float32).eval()
        with torch.no_grad():
            want = ref(x)
        print("LOAD", rank, grew / full, (got - want).abs().max().item())
    """))
    p = torchrun([str(script)], timeout=240)
    rows = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("LOAD")]
    assert len(rows) == 2, p.stdout
    for rank, frac, diff in rows:
        assert float(diff) <= 1e-5, (rank, diff)
        assert float(frac) < 0.75, (rank, frac)    # a full fp32 load alone is 1.0 (+ the bf16 file's pages)


def test_fsdp_run_from_a_checkpoint_loads_sharded_and_equals_one_process(tmp_path, tok_path):
    """DPO with a precomputed reference: the table's key is hashed from the shards (every rank agrees).
    The data come from files: rank 0 tokenizes them into the cache, rank 1 maps it."""
    import glob
    import data
    import train
    from model import ModelArgs, Transformer
    from test_train import max_diff, weights
    ck = str(tmp_path / "init")
    hf_io.save_model(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=320,
                          sliding_window=None)).init_weights(seed=3), ck)
    for name, rows in (("train", data.synthetic_pairs(64, 0)), ("eval", data.synthetic_pairs(16, 1))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = TINY + [f"--tokenizer={tok_path}", f"--init_from={ck}", "--loss=dpo", "--max_steps=2", "--eval_every=2",
                     f"--data={tmp_path / 'train.jsonl'}", f"--eval_data={tmp_path / 'eval.jsonl'}"]
    train.main(common + [f"--out_dir={tmp_path / 'one'}", "--micro_batch_size=8"])
    p = torchrun([GUARD] + common + [f"--out_dir={tmp_path / 'two'}", "--micro_batch_size=4", "--parallel=fsdp"])
    assert "model load (sharded, each rank its part)" in p.stdout
    assert len(glob.glob(str(tmp_path / "two" / "data_cache" / "pairs-*"))) == 2      # train and eval
    r1, r2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert abs(r1[0]["loss"] - r2[0]["loss"]) < 1e-6 and "eval/loss" in r2[-1]
    assert abs(r1[-1]["eval/loss"] - r2[-1]["eval/loss"]) < 1e-6
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-4


def dcp_nested(ck):
    """The resumable state of a checkpoint (dcp/), {"model": ..., "optim": ...}, read in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = os.path.join(ck, "..", os.path.basename(ck) + "-state.pt")
    dcp_to_torch_save(os.path.join(ck, "dcp"), out)
    return torch.load(out, weights_only=True)


def dcp_state(ck):
    """dcp_nested as one flat dict {".model.name": tensor, ".optim.state.name.key": ...}."""
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = x
    walk("", dcp_nested(ck))
    return flat


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_rank_resume_from_the_sharded_checkpoint_is_bit_identical(tmp_path, tok_path, parallel):
    """Killed after writing step 2 (simulated: the later checkpoint removed), 2 ranks resume from the
    2-rank dcp/ state. FSDP2 starts from a bf16 checkpoint: its export is bf16 (loads in transformers),
    while the fp32 master weights in dcp/ keep the resume exact."""
    import shutil
    from model import ModelArgs, Transformer
    from safetensors.torch import load_file
    common = TINY + [f"--tokenizer={tok_path}", "--loss=ift", "--max_steps=4", "--save_every=2", "--keep_last=5",
                     "--micro_batch_size=4", f"--parallel={parallel}", "--optimizer=rmsprop"]
    if parallel == "fsdp":
        init = str(tmp_path / "init")
        hf_io.save_model(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=320,
                              sliding_window=None)).init_weights(seed=3), init, dtype=torch.bfloat16)
        common.append(f"--init_from={init}")
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun([GUARD] + common + [f"--out_dir={full}"])
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "ckpt-000004")
    with open(cut / "metrics.jsonl") as f:
        kept = [line for line in f if json.loads(line)["step"] <= 2]
    open(cut / "metrics.jsonl", "w").writelines(kept)
    torchrun([GUARD] + common + [f"--out_dir={cut}", "--resume=true"])
    assert [r["loss"] for r in metrics(full)] == [r["loss"] for r in metrics(cut)]
    a, b = dcp_state(str(full / "ckpt-000004")), dcp_state(str(cut / "ckpt-000004"))
    assert a.keys() == b.keys() and any(".optim.state." in k for k in a)
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert all(a[k].dtype == torch.float32 for k in a if k.startswith(".model.") and torch.is_tensor(a[k]))
    ea, eb = load_file(full / "ckpt-000004" / "model.safetensors"), load_file(cut / "ckpt-000004" / "model.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    want = torch.bfloat16 if parallel == "fsdp" else torch.float32
    assert {t.dtype for t in ea.values()} == {want}
    cfg = json.load(open(full / "ckpt-000004" / "config.json"))
    assert cfg["torch_dtype"] == str(want).removeprefix("torch.")
    if parallel == "fsdp":
        transformers = pytest.importorskip("transformers")
        ck = str(full / "ckpt-000004")
        hf = transformers.AutoModelForCausalLM.from_pretrained(ck, attn_implementation="eager").eval()
        assert hf.dtype == torch.bfloat16                   # from config.json's torch_dtype
        hf, ours = hf.float(), hf_io.load_model(ck, dtype=torch.float32).eval()
        x = torch.randint(3, 320, (2, 20))
        with torch.no_grad():
            assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_export_dtype_follows_the_init_checkpoint(tmp_path):
    from infra import checkpoint
    import train
    from infra.hf_io import CheckpointError
    init = tmp_path / "init"
    init.mkdir()
    cfg = train.parse_config([])
    assert checkpoint.export_dtype(cfg) == torch.float32                       # random init
    for key, name, want in (("torch_dtype", "bfloat16", torch.bfloat16), ("dtype", "float16", torch.float16)):
        (init / "config.json").write_text(json.dumps({key: name}))           # transformers 4.x / 5.x
        assert checkpoint.export_dtype(train.parse_config([f"--init_from={init}"])) == want
    assert checkpoint.export_dtype(train.parse_config([f"--init_from={init}", "--save_dtype=fp32"])) == torch.float32
    with pytest.raises(CheckpointError, match="--save_dtype='int8' is not one of"):
        checkpoint.export_dtype(train.parse_config(["--save_dtype=int8"]))


def test_checkpoint_is_flushed_before_the_rename(tmp_path, monkeypatch):
    from infra.atomic import write_dir
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)

    def write(d):
        os.makedirs(os.path.join(d, "dcp"))
        for name in ("trainer_state.pt", "dcp/__0_0.distcp"):
            open(os.path.join(d, name), "w").write("x")
    write_dir(str(tmp_path / "ckpt-000002"), write)
    # paths inside the temp dir .tmp-ckpt-000002-XXXX/ ("" = the temp dir itself)
    names = {p.split("/.tmp-ckpt-000002-")[1].partition("/")[2] for p in synced if "/.tmp-ckpt-000002-" in p}
    assert {"trainer_state.pt", "dcp/__0_0.distcp", "dcp", ""} <= names, synced   # files, sub-dir, the dir
    assert synced[-1] == str(tmp_path)                                           # then the rename, in its parent


def test_tokenization_cache_hits_on_the_second_start_and_stores_under_5_bytes_a_token(tmp_path, tok_path, monkeypatch):
    import data, tokenizer
    from infra import tokcache
    import train
    tok, cache = tokenizer.Tokenizer(tok_path), str(tmp_path / "cache")
    for kind, rows, load, kw in (
            ("sft", data.synthetic_task(40, 0), data.load_sft, dict(max_length=40, empty_system=True)),
            ("pairs", data.synthetic_pairs(40, 1), data.load_pairs, dict(max_length=40, max_prompt_length=20))):
        src = tmp_path / f"{kind}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        want, want_stats = load(str(src), tok, **kw)
        first, stats = tokcache.load(load, str(src), tok, cache, 0, False, **kw)     # tokenizes, writes
        assert list(first) == want and stats["truncated"] == want_stats["truncated"] > 0
        calls = []
        with monkeypatch.context() as m:
            m.setattr(tok, "encode", lambda *a, **k: calls.append(1) or [])
            again, _ = tokcache.load(load, str(src), tok, cache, 0, False, **kw)   # second start: mapped
            assert not calls and isinstance(again, tokcache.CachedExamples)
            assert list(again) == want and again[-1] == want[-1] and again[1:3] == want[1:3]
            assert again.lengths() == train.example_lengths(want) and not calls
            assert reference.data_fingerprint(tok, again) == reference.data_fingerprint(tok, want)
            tokcache.load(load, str(src), tok, cache, 0, False, **{**kw, "max_length": 30})  # other lengths
            assert calls                                                           # miss: tokenized again
        d = stats["cache"]
        n_tokens = sum(len(e[k]) for e in want for k in tokcache.FIELDS[kind])
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        # int32 ids + int64 offsets + npy headers; at ~1,300 tokens a conversation that is 4.0 bytes a token
        assert size - 2 * 128 - os.path.getsize(os.path.join(d, "meta.json")) <= 5 * n_tokens, (size, n_tokens)
        os.utime(src, ns=(1, 1))                                           # the file changed: a new key
        assert tokcache.cache_key(str(src), "", tok, kind, kw) != os.path.basename(d).split("-", 1)[1]


M7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
           intermediate_size=14336, vocab_size=32000, model_type="mistral", torch_dtype="bfloat16")


def test_memory_plan_counts_the_model_and_refuses_ddp_at_7b(tmp_path, monkeypatch):
    import types
    from infra import memplan
    import train
    from model import ModelArgs, Transformer
    a = ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=320)
    assert memplan.n_params(a) == Transformer(a).num_params()
    kw = dict(micro_batch_size=8, seq_len=1024, optimizer="rmsprop", bf16=True, grad_checkpointing=True, loss="ift")
    m7b = hf_io.args_from_hf_config(M7B)
    assert abs(memplan.n_params(m7b) / 1e9 - 7.24) < 0.01
    fsdp, ddp = memplan.plan(m7b, 8, "fsdp", **kw), memplan.plan(m7b, 8, "ddp", **kw)
    assert abs(fsdp["params"] - 4 * 7.24e9 / 8 / 2**30) < 0.01 and fsdp["grads"] == fsdp["params"] == fsdp["optimizer"]
    assert ddp["grads"] == ddp["params"] and ddp["total"] > 80 and fsdp["total"] < 30   # DDP: gradient bucket views
    # what train.py does at start on an 80 GB GPU (its size faked here): DDP at 7B stops before the load
    init = tmp_path / "m7b"
    init.mkdir()
    (init / "config.json").write_text(json.dumps(M7B))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=80 * 10**9))
    tok = types.SimpleNamespace(vocab_size=32000, bos_id=1, eos_id=2)
    gpu = types.SimpleNamespace(type="cuda")
    cfg = train.parse_config([f"--init_from={init}", "--config=configs/mistral7b_ift.json", "--parallel=ddp"])
    with pytest.raises(SystemExit, match=r"does not fit: DDP .* try FSDP2 on >= \d GPUs"):
        train.memory_plan(cfg, tok, gpu, 8, True, True, 0)
    train.memory_plan(train.parse_config([f"--init_from={init}", "--config=configs/mistral7b_ift.json"]),
                      tok, gpu, 8, True, True, 0)                  # FSDP2 on 8: fits, prints the plan
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=141 * 10**9))
    train.memory_plan(cfg, tok, gpu, 1, False, True, 0)            # one process on a 141 GB GPU: fits


def test_mfu_needs_a_known_peak_and_counts_ifts_extra_forward():
    from infra import memplan
    import train
    from model import ModelArgs, Transformer
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=320))
    assert memplan.peak_flops(torch.device("cpu"), True) is None
    assert memplan.mfu(1e9, 100, 1.0, None, 1) is None                       # unknown device: no MFU
    sft, ift = (memplan.flops_per_token(m, 64, train.parse_config([f"--loss={x}"])) for x in ("sft", "ift"))
    assert ift == sft * 4 / 3 and sft == m.flops_per_token(64)
    assert memplan.mfu(sft, 1000, 2.0, 1e12, 2) == sft * 1000 / 2.0 / 2e12


def test_a_checkpoint_of_the_earlier_layout_still_resumes_exactly(tmp_path, tok_path):
    """Optimizer inside trainer_state.pt, fp32 weights only in model.safetensors, no dcp/: as written before."""
    import shutil
    import train
    from test_train import weights
    common = TINY + [f"--tokenizer={tok_path}", "--loss=sft", "--max_steps=4", "--save_every=2", "--keep_last=5",
                     "--micro_batch_size=8"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.main(common + [f"--out_dir={full}"])
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "ckpt-000004")
    ck = cut / "ckpt-000002"
    old = torch.load(ck / "trainer_state.pt", weights_only=True)
    torch.save({**old, "optimizer": dcp_nested(str(ck))["optim"]}, ck / "trainer_state.pt")
    shutil.rmtree(ck / "dcp")
    open(cut / "metrics.jsonl", "w").writelines(l for l in open(full / "metrics.jsonl") if json.loads(l)["step"] <= 2)
    train.main(common + [f"--out_dir={cut}", "--resume=true"])
    a, b = weights(full), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
