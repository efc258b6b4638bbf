"""Generation: per-row seeded sampling, compute-dtype KV cache, stop_fn, FSDP2, torch.compile."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import model as M
from generate import generate
from infra import parallel
from model import ModelArgs, Transformer


def tiny(n_kv=2, window=None, std=0.3, layers=2):
    return Transformer(ModelArgs(dim=32, n_layers=layers, n_heads=4, n_kv_heads=n_kv, head_dim=8, hidden_dim=48,
                                 vocab_size=64, sliding_window=window)).init_weights(std=std, seed=0).eval()


PROMPTS = [[1, 4, 5, 9, 17, 3], [1, 9], [1, 3, 3], [1, 40, 41, 42]]


def test_row_seeded_samples_do_not_depend_on_the_batch():
    m = tiny()
    kw = dict(temperature=1.0, top_p=0.95, stop_ids=[])
    together = generate(m, PROMPTS, 10, row_seeds=[11, 12, 13, 14], **kw)
    alone = [generate(m, [p], 10, row_seeds=[s], **kw)[0] for p, s in zip(PROMPTS, [11, 12, 13, 14])]
    shuffled = generate(m, PROMPTS[::-1] + [[1, 2, 3, 4, 5, 6, 7, 8, 9]], 10, row_seeds=[14, 13, 12, 11, 99], **kw)
    assert together == alone == shuffled[:4][::-1]
    again = generate(m, PROMPTS, 10, row_seeds=[11, 12, 13, 15], **kw)
    assert again[:3] == together[:3] and again[3] != together[3]      # a row's seed drives that row only
    with pytest.raises(ValueError, match="2 row_seeds for 4 prompts"):
        generate(m, PROMPTS, 3, row_seeds=[1, 2], temperature=1.0)


def test_kv_cache_is_in_the_compute_dtype(monkeypatch):
    m = tiny()
    seen = []
    real = M.KVCache.update

    def spy(self, input_pos, k, v):
        kk, vv = real(self, input_pos, k, v)
        seen.append(kk.dtype)
        return kk, vv
    monkeypatch.setattr(M.KVCache, "update", spy)
    generate(m, PROMPTS, 3, stop_ids=[])
    assert set(seen) == {torch.float32}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(m, PROMPTS, 3, stop_ids=[])
    assert seen and set(seen) == {torch.bfloat16}        # fp32 master weights, bf16 cache
    seen.clear()
    generate(m.to(torch.bfloat16), PROMPTS, 3, stop_ids=[])
    assert seen and set(seen) == {torch.bfloat16}


@pytest.mark.parametrize("n_kv,window", [(2, None), (1, 4), (4, None)])
def test_gqa_left_padding_and_window_match_recomputation(n_kv, window):
    """Cached generation (maskless prefill, folded-GQA masked decode) == no-cache greedy recompute."""
    m = tiny(n_kv=n_kv, window=window)
    got = generate(m, PROMPTS, 12, stop_ids=[])
    for p, g in zip(PROMPTS, got):
        seq = list(p)
        for _ in range(12):
            with torch.no_grad():
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert g == seq[len(p):]
    same_len = [PROMPTS[0], PROMPTS[0][::-1]]            # no padding: the maskless prefill path
    assert generate(m, same_len, 6, stop_ids=[]) == [generate(m, [p], 6, stop_ids=[])[0] for p in same_len]


def test_stop_fn_ends_rows_like_truncation():
    m = tiny()
    free = generate(m, PROMPTS, 12, stop_ids=[])
    pattern = (free[0][2], free[0][3])                    # a two-token "stop string" row 0 contains

    def stop(row, ids):
        return any(tuple(ids[j:j + 2]) == pattern for j in range(len(ids) - 1))
    cut = generate(m, PROMPTS, 12, stop_ids=[], stop_fn=stop)
    for f, c in zip(free, cut):
        k = next((j + 2 for j in range(len(f) - 1) if tuple(f[j:j + 2]) == pattern), len(f))
        assert c == f[:k]
    assert len(cut[0]) == 4


def test_compiled_step_gives_the_eager_tokens():
    """torch.compile (inductor on CPU) of the one-token step: same greedy tokens as eager, fp32. Later
    batches of the same shape (other padding, or none) reuse the cache and its RoPE/mask tables in place
    (CUDA graphs take module state as fixed addresses: new storage would mean a re-record per batch) and
    compile nothing new."""
    m = tiny(layers=1)
    batches = [PROMPTS[:3], PROMPTS[1:], [PROMPTS[0]] * 3]
    eager = [generate(m, b, 6, stop_ids=[]) for b in batches]
    try:
        compiled = [generate(m, batches[0], 6, stop_ids=[], compile=True)]
        storage = {k: m._gen[k].data_ptr() for k in ("cos", "sin", "mask")}
        with torch._dynamo.config.patch(error_on_recompile=True):
            for b in batches[1:]:
                compiled.append(generate(m, b, 6, stop_ids=[], compile=True))
                assert {k: m._gen[k].data_ptr() for k in storage} == storage
    finally:
        m.clear_cache()
    assert compiled == eager


def _fsdp_worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m = tiny()
        mesh = init_device_mesh("cpu", (2,))
        for layer in m.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        with parallel.gathered(m):    # gathered once: ranks may then stop generating independently
            greedy = generate(m, PROMPTS[rank::2], 7)
            sampled = generate(m, PROMPTS[rank::2], 7, temperature=1.0, row_seeds=[5 + rank, 7 + rank])
        torch.save({"greedy": greedy, "sampled": sampled}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_generation_matches_the_unsharded_model(tmp_path):
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    m = tiny()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["greedy"] == generate(m, PROMPTS[rank::2], 7)
        assert got["sampled"] == generate(m, PROMPTS[rank::2], 7, temperature=1.0, row_seeds=[5 + rank, 7 + rank])
