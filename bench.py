"""
Benchmarks. Every figure is a ratio measured inside one run (same machine, same moment), never a
timed test.
  python bench.py                       # all CPU sections
  python bench.py --only=model,ift      # model | ift | train | eval | gpu
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from model import ModelArgs, Transformer


def timeit(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def small_args(vocab=32000):
    return ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=688,
                     vocab_size=vocab, sliding_window=None, max_position_embeddings=2048)


def bench_model():
    """forward+backward and generation: ours vs transformers on the same weights."""
    import transformers
    torch.manual_seed(0)
    ours = Transformer(small_args()).init_weights(seed=0)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
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
    for B in (1, 8):
        prompts = torch.randint(3, 32000, (B, 32))
        n = 64
        t_o = timeit(lambda: ours.generate(prompts.tolist(), n, stop_ids=[]), warmup=1, reps=3)
        t_h = timeit(lambda: hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         eos_token_id=None, pad_token_id=0), warmup=1, reps=3)
        print(f"generate B={B}, 64 new tokens: ours {B * n / t_o:.0f} tok/s, transformers {B * n / t_h:.0f} tok/s, "
              f"ratio ours/transformers {t_h / t_o:.2f} (goal >= 1.5)")
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="model,ift,train,eval")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, device cpu")
    for name in a.only.split(","):
        globals()[f"bench_{name}"]()


if __name__ == "__main__":
    main()
