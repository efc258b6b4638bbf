"""
Sample from a checkpoint: prompts in, the checkpoint's chat template applied, generations out.

  python sample.py                                              # the demo run in out/: its newest checkpoint
  python sample.py --model out/ckpt-000500 --prompt "Reverse the list 3 1 4."
  python sample.py --model DIR --prompt_file prompts.txt --num_samples 3 --temperature 0.8 --top_p 0.95

--model is a checkpoint directory (config.json + safetensors + its tokenizer) or a run's out_dir. Every
option: `python sample.py --help`.
"""
import sys
from dataclasses import dataclass

import torch

import tokenizer
from generate import generate
from infra import flags, hf_io
from infra.checkpoint import resolve_model
from infra.hf_io import CheckpointError


@dataclass
class SampleConfig:
    model: str = "out"              # checkpoint dir, or a run's out_dir (its newest checkpoint)
    prompt: str = "Add 12 and 30."  # the user message
    prompt_file: str = ""           # one user message per line, instead of --prompt
    system: str = ""                # a system message before each prompt
    raw: bool = False               # the prompt as plain text (BOS + text), no chat template
    num_samples: int = 1            # samples per prompt
    max_new_tokens: int = 128       # tokens per sample at most (it stops at the end-of-turn token)
    temperature: float = 0.0        # 0 = greedy
    top_p: float = 1.0              # nucleus sampling mass
    top_k: int = 0                  # keep the k most likely tokens (0 = all)
    seed: int = 1337                # sample i of prompt j draws from seed (seed, j, i)
    device: str = "auto"            # auto (cuda if available) | cpu | cuda
    dtype: str = "auto"             # auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16


def prompts_of(cfg, tok):
    texts = [l.rstrip("\n") for l in open(cfg.prompt_file, encoding="utf-8") if l.strip()] if cfg.prompt_file \
        else [cfg.prompt]
    if not texts:
        raise SystemExit(f"error: {cfg.prompt_file}: no prompt (one per line)")
    if cfg.raw:
        return texts, [([tok.bos_id] if getattr(tok, "add_bos", True) else []) + tok.encode(t) for t in texts]
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return texts, [tokenizer.render_chat(tok, system + [{"role": "user", "content": t}], add_generation_prompt=True)[0]
                   for t in texts]


def main(argv=None):
    cfg = flags.parse_dataclass(SampleConfig, sys.argv[1:] if argv is None else argv, __doc__)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    try:
        path = resolve_model(cfg.model)
        tok = tokenizer.load_tokenizer(path)
        model = hf_io.load_model(path, dtype=dtype, device=device).eval()
    except (CheckpointError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None      # a user error: the code train.py and eval_gen.py use
    texts, prompts = prompts_of(cfg, tok)
    rows = [(j, i) for j in range(len(prompts)) for i in range(cfg.num_samples)]
    outs = generate(model, [prompts[j] for j, _ in rows], cfg.max_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k or None, stop_ids=[tok.eos_id],
                          row_seeds=[hash((cfg.seed, j, i)) & (2**63 - 1) for j, i in rows])
    for (j, i), o in zip(rows, outs):
        head = f"--- {texts[j]!r}" + (f" (sample {i + 1})" if cfg.num_samples > 1 else "")
        print(f"{head}\n{tok.decode(o)}")
    return [tok.decode(o) for o in outs]


if __name__ == "__main__":
    main()
