"""
Benchmarks. Every figure is a ratio measured inside one run (same machine, same moment), never a
timed test.
  python bench.py                       # all CPU sections
  python bench.py --only=model,ift      # model | ift | train | eval | sample | scale
  BENCH_SCALE_ROWS=200000 python bench.py --only=scale   # start-up at scale (default 20,000 rows)
  python bench.py --gpu                 # the one prepared GPU run (benchmarks/gpu.py; --gpu --help for its options)
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import reference
from generate import generate
from infra import hf_io
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timeit(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def interleaved(fns, reps=5):
    """Median seconds per function, repeats interleaved so drift in machine load hits all alike
    (the first call of each, a warm-up / compile, is not counted)."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def small_args(vocab=32000):
    return ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=688,
                     vocab_size=vocab, sliding_window=None, max_position_embeddings=2048)


def bench_model():
    """forward+backward and generation: ours vs transformers on the same weights."""
    import transformers
    torch.manual_seed(0)
    ours = Transformer(small_args()).init_weights(seed=0)
    with tempfile.TemporaryDirectory() as d:
        hf_io.save_model(ours, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d)  # default (sdpa) attention
    B, T = 4, 256
    x = torch.randint(3, 32000, (B, T))
    ce = torch.nn.functional.cross_entropy

    def step(m, logits_fn):
        m.zero_grad(set_to_none=True)
        logits = logits_fn(m)
        ce(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)).backward()

    t_ours = timeit(lambda: step(ours, lambda m: m(x)))
    t_hf = timeit(lambda: step(hf, lambda m: m(input_ids=x).logits))
    print(f"fwd+bwd B={B} T={T}: ours {t_ours * 1e3:.0f} ms, transformers {t_hf * 1e3:.0f} ms, "
          f"ratio ours/transformers {t_ours / t_hf:.2f} (goal <= 0.9)")
    ours.eval(), hf.eval()
    n = 64
    for B in (1, 8):
        prompts = torch.randint(3, 32000, (B, 32))
        fns = {"ours": lambda: generate(ours, prompts.tolist(), n, stop_ids=[]),
               "ours compiled": lambda: generate(ours, prompts.tolist(), n, stop_ids=[], compile=True),
               "transformers": lambda: hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                                   max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                   eos_token_id=None, pad_token_id=0)}
        t = interleaved(fns)
        tps = {k: B * n / v for k, v in t.items()}
        print(f"generate B={B}, {n} new tokens: ours {tps['ours']:.0f} tok/s, compiled {tps['ours compiled']:.0f} tok/s, "
              f"transformers {tps['transformers']:.0f} tok/s; ours/transformers {t['transformers'] / t['ours']:.2f}x "
              f"(goal >= 1.0), compiled/eager {t['ours'] / t['ours compiled']:.2f}x")
    ours.clear_cache()
    return {}


def _step_child(kind, threads):
    """Run in a fresh process: peak RSS growth of one training step (CPU has no max_memory_allocated)."""
    import ift
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(small_args()).init_weights(seed=0)
    batch = _batch()
    fn = (lambda: ift.sft_loss(model, batch)[0]) if kind == "sft" else (lambda: ift.ift_loss(model, batch)[0])
    import ctypes
    import threading
    ctypes.CDLL("libc.so.6").malloc_trim(0)        # hand setup's freed memory back, so RSS starts low
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    base, peak, done = rss(), [0], threading.Event()

    def watch():   # sample RSS every ms during the step (activations live until backward ends)
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)
    t = threading.Thread(target=watch)
    t.start()
    fn().backward()
    done.set()
    t.join()
    print(json.dumps({"peak_kb": (max(peak[0], rss()) - base) // 1024}))


def _batch(B=4, T=256, prompt=64):
    """B rows of T tokens, the first `prompt` of them unsupervised (a chat prompt)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels}


def bench_ift(threads=2, rounds=9):
    """IFT step / SFT step on the same batch: time (interleaved rounds) and peak memory. The ratio is the
    median over rounds of that round's IFT / SFT time, so drift in machine load hits both alike; CPU time
    (this process's, all threads) is printed too: with one thread it barely moves with other jobs' load."""
    import ift
    torch.manual_seed(0)
    model = Transformer(small_args()).init_weights(seed=0)
    batch = _batch()
    fns = {"sft": lambda: ift.sft_loss(model, batch)[0].backward(),
           "ift": lambda: ift.ift_loss(model, batch)[0].backward()}
    for f in fns.values():
        f()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    ratio = lambda ts: statistics.median(a / b for a, b in zip(ts["ift"], ts["sft"]))
    t_sft, t_ift = statistics.median(wall["sft"]), statistics.median(wall["ift"])
    mem = {}
    for k in fns:
        out = subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--step_child", k, "--threads", str(threads)],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        mem[k] = json.loads(out.strip().splitlines()[-1])["peak_kb"]
    print(f"IFT/SFT step B=4 T=256 (192 answer tokens): time {t_ift * 1e3:.0f}/{t_sft * 1e3:.0f} ms, "
          f"{ratio(wall):.2f}x (median of {rounds} rounds; CPU time {ratio(cpu):.2f}x) (goal <= 1.33, the FLOP "
          f"floor: pass 1 is a no-grad forward), peak memory growth {mem['ift'] / 1024:.0f}/{mem['sft'] / 1024:.0f} "
          f"MiB = {mem['ift'] / mem['sft']:.2f}x (goal <= 1.05); load average {os.getloadavg()[0]:.1f}")


def bench_train():
    """Training tokens/s of the demo loop per objective on the same synthetic data and model."""
    import data, tokenizer
    import train
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows_txt = data.corpus_text(data.synthetic_pairs(1000, 1337))
        tokenizer.train_tokenizer(rows_txt, f"{d}/tok", 512)
        arms = [("sft", []), ("ift", []), ("dpo", ["--ref=precompute"]), ("dpo", ["--ref=online"]), ("orpo", [])]
        for i, (name, extra) in enumerate(arms):
            s = train.main([f"--loss={name}", "--max_steps=12", "--n_train=512", "--n_eval=0", "--gen_eval=0",
                            "--progress=false", "--log_every=12", f"--out_dir={d}/run{i}", f"--tokenizer={d}/tok.model"]
                           + extra)
            rows.append((name + (f" ({extra[0][6:]} reference)" if extra else ""), s["tok_s"]))
    for name, tps in rows:
        print(f"train {name:26s} {tps:7.0f} tok/s  ({tps / rows[0][1]:.2f}x SFT)")


def bench_eval():
    """arc_gen questions/s on a demo-sized model, batch 1 vs 16, eager vs compiled (ARC-format fixture questions)."""
    import data, tokenizer
    import eval_gen
    with tempfile.TemporaryDirectory() as d:
        tok = tokenizer.train_tokenizer(data.corpus_text(data.synthetic_task(500, 0)), f"{d}/tokenizer", 512)
        m = Transformer(ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=688,
                                  vocab_size=tok.vocab_size, sliding_window=None)).init_weights(seed=0)
        hf_io.save_model(m, f"{d}/model", extra_files={"tokenizer.model": tok.path})
        qs = [l for l in open(os.path.join(ROOT, "tests/fixtures/arc_ai2.jsonl")) if l.strip()]
        with open(f"{d}/arc.jsonl", "w") as f:
            f.writelines((qs * 64)[:64])
        res = {}
        # "16c" twice: the first run pays torch.compile, the second (same process) is what is reported
        for name, bs, extra in (("1", 1, []), ("16", 16, []), ("16c", 16, ["--compile"]), ("16c", 16, ["--compile"])):
            eval_gen.main(["--model", f"{d}/model", "--task", "arc_gen", "--data", f"{d}/arc.jsonl",
                           "--batch_size", str(bs), "--out", f"{d}/out{name}"] + extra)
            res[name] = json.load(open(f"{d}/out{name}/arc_gen_summary.json"))["questions_per_second"]
    print(f"arc_gen (random demo-sized model, 64 questions): batch 1 {res['1']:.2f} q/s, batch 16 {res['16']:.2f} q/s "
          f"= {res['16'] / res['1']:.1f}x, batch 16 compiled {res['16c']:.2f} q/s = {res['16c'] / res['16']:.2f}x eager")


def bench_sample():
    """On-policy sampling prompts/s: one generate call per prompt (n_samples rows, the loop before batching)
    vs 64 rows per call; same prompts and per-row seeds, so the same samples."""
    import data, tokenizer
    import onpolicy
    import train
    with tempfile.TemporaryDirectory() as d:
        tok = tokenizer.train_tokenizer(data.corpus_text(data.synthetic_task(500, 0)), f"{d}/tok", 512)
        ex, _ = data.load_sft(data.synthetic_task(32, 1), tok)
        model = Transformer(ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=688,
                                      vocab_size=tok.vocab_size, sliding_window=None)).init_weights(seed=0)
        samplers = {bs: onpolicy.Sampler(train.parse_config(["--loss=sft", "--onpolicy_every=1", "--n_samples=4",
                                                             "--max_new_tokens=24", f"--sample_batch_size={bs}"]),
                                         tok, ex, 0, 1) for bs in (4, 64)}
        cpu = torch.device("cpu")
        t = interleaved({bs: (lambda s=s: s.refresh(model, 0, range(32), cpu)) for bs, s in samplers.items()}, reps=3)
        same = samplers[4].samples == samplers[64].samples
    print(f"on-policy sampling, 32 prompts x 4 samples x 24 tokens: one call per prompt {32 / t[4]:.1f} prompts/s, "
          f"64 rows per call {32 / t[64]:.1f} prompts/s = {t[4] / t[64]:.1f}x (same samples: {same})")


def _chat_rows(n, seed, words_per_turn):
    """UltraChat-shaped rows: 3 user/assistant exchanges of random words (long answers, shorter questions)."""
    import random
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    say = lambda k: " ".join(rng.choice(vocab) for _ in range(k)) + "."
    return [{"messages": [m for _ in range(3) for m in ({"role": "user", "content": say(words_per_turn // 4)},
                                                        {"role": "assistant", "content": say(words_per_turn)})]}
            for _ in range(n)]


def _scale_child(mode, path, tok_path, cache):
    """Run in a fresh process: load the chat file as train.py's start does (tokenize to Python lists, or map
    the cache; then the lengths and the data fingerprint), report the time, the tokens and the peak RSS."""
    import resource
    import data, tokenizer
    from infra import tokcache
    import train
    tok = tokenizer.Tokenizer(tok_path)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if mode == "lists":
        ex, _ = data.load_sft(path, tok, max_length=2048)
    else:
        ex, _ = tokcache.load(data.load_sft, path, tok, cache, 0, False, max_length=2048)
    n_tok = sum(train.example_lengths(ex))
    reference.data_fingerprint(tok, ex)           # every start hashes the examples too
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"s": dt, "rows": len(ex), "tokens": n_tok, "rss_mib": peak / 1024, "grew_mib": (peak - base) / 1024}))


def bench_scale(rows=None):
    """Start-up at scale: a chat file shaped like UltraChat-200k tokenized cold (Python lists), into the
    cache, and mapped from it (rows/s, peak RSS); reference log-prob precompute pairs/s; the memory plan."""
    import data, tokenizer
    from infra import memplan
    import reference
    rows = rows or int(os.environ.get("BENCH_SCALE_ROWS", 20000))
    with tempfile.TemporaryDirectory() as d:
        tok = tokenizer.train_tokenizer(data.corpus_text(_chat_rows(300, 1, 120)), f"{d}/tok", 8000)
        per_word = len(tok.encode(" ".join(m["content"] for m in _chat_rows(20, 2, 120)[0]["messages"]))) / (
            3 * (120 + 30))
        words = int(1300 / 3 / per_word / 1.25)     # ~1,300 tokens a conversation (an answer = 4 questions' words)
        path = f"{d}/chat.jsonl"
        with open(path, "w") as f:
            for r in _chat_rows(rows, 0, words):
                f.write(json.dumps(r) + "\n")
        res = {}
        for mode in ("lists", "cold", "cached"):      # cold: tokenizes and writes the cache; cached: maps it
            out = subprocess.run([sys.executable, "-m", "benchmarks.cpu", "--scale_child", mode, path, f"{d}/tok.model",
                                  f"{d}/cache"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
        r = res["lists"]
        print(f"tokenize {r['rows']} UltraChat-shaped rows ({r['tokens'] / r['rows']:.0f} tokens each, "
              f"{os.path.getsize(path) / 2**20:.0f} MiB jsonl): to Python lists {r['rows'] / r['s']:.0f} rows/s, "
              f"peak RSS growth {r['grew_mib']:.0f} MiB ({r['grew_mib'] * 2**20 / r['tokens']:.1f} B/token); "
              f"into the cache {res['cold']['rows'] / res['cold']['s']:.0f} rows/s; from the cache "
              f"{res['cached']['rows'] / res['cached']['s']:.0f} rows/s = {res['lists']['s'] / res['cached']['s']:.0f}x "
              f"faster, peak RSS growth {res['cached']['grew_mib']:.0f} MiB "
              f"({res['cached']['grew_mib'] * 2**20 / r['tokens']:.1f} B/token)")
    # reference log-probs, one process, the small model: pairs/s of reference.precompute
    with tempfile.TemporaryDirectory() as d:
        tok = tokenizer.train_tokenizer(data.corpus_text(data.synthetic_pairs(300, 0)), f"{d}/tok", 512)
        ex, _ = data.load_pairs(data.synthetic_pairs(256, 1), tok, 256, 128)
        model = Transformer(small_args(tok.vocab_size)).init_weights(seed=0)
        batches = [list(range(i, min(i + 32, len(ex)))) for i in range(0, len(ex), 32)]
        t = time.perf_counter()
        reference.precompute(model, ex, batches, tok.pad_id, False, torch.device("cpu"), contextlib.nullcontext(),
                            f"{d}/ref.pt", 0, 1, progress=False)
        dt = time.perf_counter() - t
        print(f"reference log-probs (small model, {len(ex)} synthetic pairs, batches of 32): {len(ex) / dt:.0f} pairs/s")
    memplan.main()


def main(argv=None):
    from infra import flags
    ap = flags.Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="--gpu: the prepared GPU run instead (benchmarks/gpu.py; python bench.py --gpu --help)")
    ap.add_argument("--only", default="model,ift,train,eval,sample",
                    help="comma-separated sections: model, ift, train, eval, sample, scale (default: all but scale)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--step_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale_child", nargs=4, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.step_child:
        return _step_child(a.step_child, a.threads)
    if a.scale_child:
        return _scale_child(*a.scale_child)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, device cpu")
    for name in a.only.split(","):
        globals()[f"bench_{name}"]()


if __name__ == "__main__":
    main()
