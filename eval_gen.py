"""
Evaluate a checkpoint on ARC-Challenge (generation, log-likelihood) and GSM8K the way
lm-evaluation-harness does, on one device or under torchrun (strided slices, rank 0 merges).

  python eval_gen.py --model DIR --task arc_gen --data ARC-Challenge-Test.jsonl
  python eval_gen.py --model DIR --task arc_ll --data test.jsonl --fewshot_data train.jsonl   # 25-shot
  python eval_gen.py --model DIR --task gsm8k  --data test.jsonl --fewshot_data train.jsonl   # 5-shot

DIR: HF-layout checkpoint + its tokenizer (tokenizer.json with its chat template, or tokenizer.model
with Zephyr's; tokenizer.load_tokenizer). Data: AI2's ARC jsonl, HF allenai/ai2_arc rows, GSM8K
{"question", "answer"}; .jsonl, .json or .parquet. Writes OUT/<task>.jsonl and OUT/<task>_summary.json.

A tokenizer.json checkpoint (Llama-3, SmolLM2, ...): arc_gen renders [user message, assistant
"The best answer is"] through the checkpoint's own template with continue_final_message, as lm-eval's
--apply_chat_template does, BOS only where the template writes it; generation stops on the template's
end-of-turn token (<|eot_id|>, <|im_end|>). arc_ll and gsm8k are plain text with BOS exactly when the
tokenizer adds one to plain text (Llama-3 yes, SmolLM2 no). The Zephyr notes below are sentencepiece's.

arc_gen = the harness's arc_challenge_chat (lm_eval/tasks/arc/arc_challenge_chat.yaml, filters in
lm_eval/filters/extraction.py, exact_match_hf_evaluate in lm_eval/api/metrics.py, gen_prefix in
lm_eval/api/task.py, decoding in lm_eval/models/huggingface.py generate_until):
  1. user: "Given the following question and four candidate answers (A, B, C and D), choose the best
     answer.\\nQuestion: {stem.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nYour response should end with \\"The
     best answer is [the_answer_letter]\\" where the [the_answer_letter] is one of A, B, C or D."
     Target: answerKey, "1".."4" -> "A".."D".
  2. gen_prefix "The best answer is" becomes an assistant message rendered with
     continue_final_message=True: the prompt ends "<|assistant|>\\nThe best answer is" (no EOS).
  3. Greedy, <= 100 new tokens, decoded ON THEIR OWN (special tokens skipped), then cut at the first
     "\\n\\n" or "." (s = s.split(term)[0] per term).
  4. remove_whitespace: strip ALL leading and trailing whitespace (the harness's filter does
     str.strip() now); take_first.
  5. exact_match(ignore_case, ignore_punctuation): lower-case, delete string.punctuation, compare.
  " C." -> "C" right; " C because" -> wrong; " (c)" -> right; "\\nC", "  C", "C\\n" -> right. A
  sentencepiece decode of the new tokens alone also drops their first piece's leading space (we
  decode the same way); special tokens (<s>, </s>, <unk>) are skipped, as the harness decodes.
  Ours on top: lenient = first `answer is:?\\s*\\(?([A-E])\\b` in "The best answer is" + generation,
  else the first standalone capital letter, counted only if the question has that choice;
  invalid = no such letter.
  Deviations: (a) 3 choices: the harness still says "four ... (A, B, C and D)"; 5 choices: it hides
  E (an E answer can never score). We show every choice and adapt the count and both letter lists
  ("five candidate answers (A, B, C, D and E)", "one of A, B, C, D or E"); 4 choices: identical text.
  --harness_four_choices keeps the harness's fixed text (and hides E) instead.
  (b) BOS first, as the model was trained. This matches the harness for Mistral's and Zephyr's
  tokenizers: their tokenizer_config says add_bos_token: true and HFLM then feeds BOS too. --no_bos
  drops it: what the harness does with a tokenizer that adds no BOS. Only a BOS the tokenizer adds is
  dropped, never template text (ChatML's <|im_start|> is SmolLM2's BOS token, and stays).
  (c) the harness's YAML writes the prompt in single quotes, so its model sees a literal backslash-n
  (two characters) in six places (after "answer.", after the question, after each choice) where we
  send real newlines; --harness_literal_newlines reproduces that byte for byte (4-choice questions;
  3- and 5-choice ones too with --harness_four_choices).
  Pre-fill tokens: after the last EOS the text "\\n<|assistant|>\\nThe best answer is" is ONE piece,
  one sentencepiece call (what HF's legacy tokenizer does with the harness's string), so
  "The" follows "\\n" with no "▁" (Mistral: 1014 "The", not 415 "▁The").
arc_ll = the harness's arc_challenge (Open LLM Leaderboard, 25-shot): context "Question: {stem}\\nAnswer:",
  continuation " {choice}"; shots "Question: ..\\nAnswer: {gold text}" joined by "\\n\\n". Tokens as
  HFLM._encode_pair: trailing context spaces move to the continuation, the whole string is encoded
  once and the continuation is what lies past len(encode(context)). Score = sum of its log-probs;
  acc = argmax score, acc_norm = argmax score / len(choice) (characters, the harness's completion_len;
  bytes for ASCII). Plain text, BOS first.
gsm8k = the harness's gsm8k v3, plain text (BOS first, no chat template): shots "Question: {q}\\nAnswer:
  {answer}" joined by "\\n\\n"; greedy, 256 tokens, stop at "Question:", "</s>", "<|im_end|>"; the new
  tokens decoded with special tokens skipped (a generated <s> is no text, as in the harness). strict =
  first "#### (-?[0-9.,]+)", flexible = last "(-?[$0-9.,]{2,})|(-?[0-9]+)"; both sides lose ",", "$",
  "...#### " and a final "." before comparing. accuracy: strict if the output has "####", else flexible.
Generation stops a row as soon as its text holds a stop string (results equal running to the
  limit and cutting); rows are batched by prompt length; bf16 by default on CUDA (fp32 on CPU);
  --compile compiles the one-token decode step (CUDA graphs on CUDA).
Shots: random.Random(seed * 1_000_003 + question index).sample(pool minus the same question), so any
  number of ranks draws the same ones. stderr = sqrt(p(1-p)/(n-1)), the harness's sample stderr.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

import data
import tokenizer
from generate import generate
from infra import atomic, flags, hf_io, parallel
from infra.checkpoint import resolve_model
from infra.hf_io import CheckpointError
from tasks import (ARC_PREFILL, ARC_STOPS, GSM8K_STOPS, LETTERS, TaskDataError, arc_lenient, arc_strict,
                   arc_user_message, gsm8k_extract, normalize_number, parse_arc, parse_gsm8k, truncate_at_stops)

DEFAULTS = {"arc_gen": dict(num_fewshot=0, max_new_tokens=100), "arc_ll": dict(num_fewshot=25, max_new_tokens=0),
            "gsm8k": dict(num_fewshot=5, max_new_tokens=256)}


# ------------------------------------------------------------------------------------------ data


def load_task(task, path, limit=None, split=""):
    """Parsed questions; idx = position, which fixes few-shot draws and the merge order. path: a file,
    glob, directory of shards (+ split) or mixture, as train.py's --data (data.read_source)."""
    try:
        rows = data.read_source(path, split)[0]   # jsonl/json/parquet with file:line errors (data.py)
    except (ValueError, ImportError) as e:   # missing file, bad JSON, unknown suffix, parquet without pyarrow
        raise TaskDataError(str(e)) from None
    parse = parse_gsm8k if task == "gsm8k" else parse_arc
    qs = [parse(r, where) for where, r in rows][:limit or None]
    if not qs:
        raise TaskDataError(f"{path}: no rows")
    for i, q in enumerate(qs):
        q["idx"] = i
    return qs


# --------------------------------------------------------------------------------------- prompts


def arc_messages(q, literal_newlines=False, four_choices=False):
    return [{"role": "user", "content": arc_user_message(q, literal_newlines, four_choices)},
            {"role": "assistant", "content": ARC_PREFILL}]


def arc_gen_prompt(tok, q, legacy=True, bos=True, literal_newlines=False, four_choices=False):
    """[user message] through the Zephyr template, assistant turn pre-filled. render_chat ends with
    the piece "\\n<|assistant|>\\n"; swap it for the one-call encoding of that piece + the pre-fill.
    A tokenizer with its own chat template: the pre-fill continued as transformers does it. bos=False drops
    only a BOS the tokenizer itself adds (Llama-3's), never the template's own first token (SmolLM2's BOS is
    ChatML's <|im_start|>: dropping it would send "system\\n..." that no harness ever sends)."""
    if getattr(tok, "chat_template", None) is not None:
        ids, _ = tokenizer.render_chat(tok, arc_messages(q, literal_newlines, four_choices), continue_final_message=True)
        return ids[1:] if not bos and tok.add_bos and ids[:1] == [tok.bos_id] else ids
    ids, _ = tokenizer.render_chat(tok, [{"role": "user", "content": arc_user_message(q, literal_newlines, four_choices)}],
                              add_generation_prompt=True, legacy=legacy)
    head = tok.encode("\n<|assistant|>\n", dummy_prefix=legacy)
    tail = tok.encode("\n<|assistant|>\n" + ARC_PREFILL, dummy_prefix=legacy)
    if ids[-len(head):] != head or tail[:len(head)] != head:      # never guess a token boundary
        raise RuntimeError(f"{tok.path}: cannot append the pre-fill to the generation prompt")
    ids = ids[:-len(head)] + tail
    return ids if bos else ids[1:]


def arc_prompt_text(q, tok=None, literal_newlines=False, four_choices=False):
    if getattr(tok, "chat_template", None) is not None:
        return tok.render_text(arc_messages(q, literal_newlines, four_choices), continue_final_message=True)
    return tokenizer.chat_text([{"role": "user", "content": arc_user_message(q, literal_newlines, four_choices)}],
                          add_generation_prompt=True) + ARC_PREFILL


def fewshot(pool, k, seed, q, key):
    """k shots for question q from a per-question RNG: the same draw on any number of ranks."""
    cands = [p for p in pool or [] if p[key] != q[key]]
    if len(cands) < k:
        raise TaskDataError(f"{k}-shot needs {k} examples, the few-shot file has {len(cands)} usable")
    return random.Random(seed * 1_000_003 + q["idx"]).sample(cands, k) if k else []


def arc_ll_context(q, shots):
    return "\n\n".join([f"Question: {s['stem']}\nAnswer: {s['choices'][s['gold']]}" for s in shots]
                       + [f"Question: {q['stem']}\nAnswer:"])


def gsm8k_context(q, shots):
    return "\n\n".join([f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots]
                       + [f"Question: {q['question']}\nAnswer:"])


def encode_pair(tok, context, continuation, bos=True):
    """(context ids, continuation ids) the harness's way: the whole string encoded once, split at
    len(encode(context)), so the scored tokens are exactly the ones the model sees."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    pre = [tok.bos_id] if bos and getattr(tok, "add_bos", True) else []   # BOS as the tokenizer adds it
    whole = pre + tok.encode(context + continuation)
    n_ctx = len(pre) + len(tok.encode(context))
    return whole[:n_ctx], whole[n_ctx:]


# --------------------------------------------------------------------------------------- scoring


def stderr(xs):
    if len(xs) < 2:
        return None
    p = sum(xs) / len(xs)
    return math.sqrt(p * (1 - p) / (len(xs) - 1))


# ---------------------------------------------------------------------------------- model calls
def stop_token_ids(tok, stops):
    """EOS + every token whose own text holds a stop string: what follows it is cut anyway, so
    stopping there changes no result and saves the remaining decode steps."""
    return [tok.eos_id] + [i for i in range(tok.vocab_size)
                           if i != tok.eos_id and any(s in tok.decode([i]) for s in stops)]


def stop_string_fn(tok, stops):
    """generate's stop_fn: True once a row's text holds a stop string. An occurrence that the newest
    token completes spans at most len(stop in bytes) tokens (each holds one of its bytes at least),
    so decoding that many last tokens finds it; and text found there is in the full text too, which
    is cut at the first stop anyway: stopping here changes no result."""
    w = max(len(s.encode()) for s in stops)

    def stop_fn(row, ids):
        text = tok.text_of(text_ids(tok, ids[-4 * w:])[-w:])
        return any(s in text for s in stops)
    return stop_fn


def batches(lengths, batch_size):
    """Index batches, longest first: similar lengths share a batch (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def generate_all(model, prompts, max_new_tokens, batch_size, stop_ids, progress=None, stop_fn=None,
                 compile=False):
    out = [None] * len(prompts)
    for idx in batches([len(p) for p in prompts], batch_size):
        rows = [prompts[i] for i in idx]
        if compile:   # a short last batch is filled up: one batch shape, one compiled step / CUDA graph
            rows += [rows[-1]] * (batch_size - len(rows))
        gens = generate(model, rows, max_new_tokens, stop_ids=stop_ids, stop_fn=stop_fn, compile=compile)
        for i, g in zip(idx, gens):
            out[i] = list(g)
        if progress is not None:
            progress.update(len(idx))
    if compile and hasattr(model, "clear_cache"):
        model.clear_cache()
    return out


@torch.no_grad()
def loglikelihoods(model, requests, batch_size, pad_id, device="cpu", progress=None):
    """[(ids, n)] -> sum of log p(last n tokens | the rest). Right-padded; `select` asks for logits
    only where a continuation token is predicted, never for the (25-shot) context."""
    out = [0.0] * len(requests)
    for idx in batches([len(r[0]) for r in requests], batch_size):
        T = max(len(requests[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask, sel, targets = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool), []
        for b, i in enumerate(idx):
            seq, n = requests[i]
            ids[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), 1
            sel[b, len(seq) - n - 1:len(seq) - 1] = True            # position t predicts token t + 1
            targets += seq[-n:]
        logits = model(ids.to(device), attention_mask=mask.to(device), select=sel.to(device))
        lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(targets, device=logits.device)[:, None])
        for i, part in zip(idx, lp.squeeze(-1).split([requests[i][1] for i in idx])):
            out[i] = part.sum().item()
        if progress is not None:
            progress.update(len(idx))
    return out


def max_context(model, reserve):
    return getattr(getattr(model, "args", None), "max_position_embeddings", 1 << 30) - reserve


def text_ids(tok, ids):
    """ids with text: special tokens (<s>, </s>, <unk>, ids past the vocabulary) skipped, as the
    harness decodes (skip_special_tokens=True)."""
    sp = getattr(tok, "sp", None)
    if sp is None:   # tokenizer.json: its special (added) tokens
        return [t for t in ids if 0 <= t < tok.vocab_size and t not in tok.special_ids]
    return [t for t in ids if 0 <= t < tok.vocab_size and not (sp.is_control(t) or sp.is_unknown(t))]


def decode_gen(tok, gen):
    """(text as it reads after the prompt, leading space kept; the tokens decoded alone, which drops
    the first piece's leading space: what the harness scores). Special tokens skipped."""
    gen = text_ids(tok, gen)
    return tok.text_of(gen), tok.decode(gen)


# ------------------------------------------------------------------------------------------ tasks
def run_arc_gen(model, tok, questions, *, batch_size=1, max_new_tokens=100, legacy=True, bos=True,
                early_stop=True, literal_newlines=False, four_choices=False, compile=False, progress=None, **_):
    prompts = [arc_gen_prompt(tok, q, legacy, bos, literal_newlines, four_choices)[-max_context(model, max_new_tokens):]
               for q in questions]
    stop_ids = stop_token_ids(tok, ARC_STOPS) if early_stop else [tok.eos_id]
    stop_fn = stop_string_fn(tok, ARC_STOPS) if early_stop else None
    records = []
    for q, g in zip(questions, generate_all(model, prompts, max_new_tokens, batch_size, stop_ids, progress,
                                            stop_fn, compile)):
        text, alone = (truncate_at_stops(t, ARC_STOPS) for t in decode_gen(tok, g))
        gold, letter = LETTERS[q["gold"]], arc_lenient(text, len(q["choices"]))
        response, correct = arc_strict(alone, gold)
        records.append({"idx": q["idx"], "id": q["id"], "n_choices": len(q["choices"]),
                        "prompt": arc_prompt_text(q, tok, literal_newlines, four_choices),
                        "generation": text, "response": response, "extracted": letter, "gold": gold,
                        "correct": correct, "lenient_correct": letter == gold, "invalid": letter is None,
                        "new_tokens": len(g)})
    return records


def run_arc_ll(model, tok, questions, *, pool=None, num_fewshot=25, seed=1234, batch_size=1, bos=True,
               device="cpu", progress=None, **_):
    contexts = [arc_ll_context(q, fewshot(pool, num_fewshot, seed, q, "stem")) for q in questions]
    requests = []
    for q, ctx in zip(questions, contexts):
        for c in q["choices"]:
            a, b = encode_pair(tok, ctx, " " + c, bos)
            requests.append(((a + b)[-max_context(model, 0):], len(b)))   # harness: cut the context's left
    lls, records = loglikelihoods(model, requests, batch_size, tok.pad_id, device, progress), []
    for q, ctx in zip(questions, contexts):
        n, ll, lls = len(q["choices"]), lls[:len(q["choices"])], lls[len(q["choices"]):]
        pred = max(range(n), key=lambda i: ll[i])
        norm = max(range(n), key=lambda i: ll[i] / len(q["choices"][i]))
        records.append({"idx": q["idx"], "id": q["id"], "n_choices": n, "prompt": ctx, "choices": q["choices"],
                        "loglik": ll, "extracted": LETTERS[pred], "extracted_norm": LETTERS[norm],
                        "gold": LETTERS[q["gold"]], "correct": pred == q["gold"], "correct_norm": norm == q["gold"]})
    return records


def run_gsm8k(model, tok, questions, *, pool=None, num_fewshot=5, seed=1234, batch_size=1, max_new_tokens=256,
              bos=True, early_stop=True, compile=False, progress=None, **_):
    contexts = [gsm8k_context(q, fewshot(pool, num_fewshot, seed, q, "question")) for q in questions]
    pre = [tok.bos_id] if bos and getattr(tok, "add_bos", True) else []   # BOS as the tokenizer adds it
    prompts = [(pre + tok.encode(c))[-max_context(model, max_new_tokens):] for c in contexts]
    stop_ids = stop_token_ids(tok, GSM8K_STOPS) if early_stop else [tok.eos_id]
    stop_fn = stop_string_fn(tok, GSM8K_STOPS) if early_stop else None
    gens = generate_all(model, prompts, max_new_tokens, batch_size, stop_ids, progress, stop_fn, compile)
    records = []
    for q, ctx, g in zip(questions, contexts, gens):
        text = truncate_at_stops(decode_gen(tok, g)[0], GSM8K_STOPS)
        strict, flexible = gsm8k_extract(text)
        pred = normalize_number(strict if strict is not None else flexible)
        records.append({"idx": q["idx"], "id": q["id"], "prompt": ctx, "generation": text, "extracted": pred,
                        "gold": q["gold"], "correct": pred == q["gold"],
                        "strict_correct": normalize_number(strict) == q["gold"],
                        "flexible_correct": normalize_number(flexible) == q["gold"], "new_tokens": len(g)})
    return records


TASKS = {"arc_gen": run_arc_gen, "arc_ll": run_arc_ll, "gsm8k": run_gsm8k}
SIDE_METRICS = {"arc_gen": {"lenient": "lenient_correct", "invalid_rate": "invalid"},
                "arc_ll": {"acc_norm": "correct_norm"},
                "gsm8k": {"strict_match": "strict_correct", "flexible_match": "flexible_correct"}}


def summarize(task, records, elapsed):
    def mean(key, rs=records):
        return sum(float(r[key]) for r in rs) / len(rs) if rs else None
    s = {"task": task, "n": len(records), "accuracy": mean("correct"),
         "stderr": stderr([float(r["correct"]) for r in records])}
    for name, key in SIDE_METRICS[task].items():
        s[name], s[name + "_stderr"] = mean(key), stderr([float(r[key]) for r in records])
    if task != "gsm8k":                      # 3-, 4- and 5-choice questions, counted and scored apart
        groups = {n: [r for r in records if r["n_choices"] == n] for n in sorted({r["n_choices"] for r in records})}
        s["by_n_choices"] = {str(n): {"n": len(rs), "accuracy": mean("correct", rs)} for n, rs in groups.items()}
    if task != "arc_ll":
        s["new_tokens"] = sum(r["new_tokens"] for r in records)
    s["elapsed_s"], s["questions_per_second"] = elapsed, (len(records) / elapsed if elapsed > 0 else None)
    return s


def one_line(s):
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"
    side = " ".join(f"{k}={f(s[k])}" for k in SIDE_METRICS[s["task"]])
    return (f"{s['task']}: accuracy={f(s['accuracy'])} ± {f(s['stderr'])} {side} n={s['n']} "
            f"({s['questions_per_second'] or 0:.2f} questions/s)")


# ------------------------------------------------------------------------------- ranks and files
def shard(items, rank, world):
    return items[rank::world]


def merge(parts):
    """Per-rank records -> one list in question order: what a single process writes."""
    return sorted((r for part in parts for r in part), key=lambda r: r["idx"])


def load_model(path, dtype, device, tokenizer_path=None):
    try:   # the checkpoint dir's tokenizer.json / tokenizer.model, or --tokenizer
        tok = tokenizer.load_tokenizer(tokenizer_path or path)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e} (save the tokenizer with the checkpoint, or pass --tokenizer)")
    model = hf_io.load_model(path, dtype=dtype, device=device).eval()
    if tok.vocab_size > model.args.vocab_size:
        raise SystemExit(f"{tok.path}: {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    return tok, model


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir (HF layout + tokenizer.json or tokenizer.model)")
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--data", required=True, help="questions: .jsonl, .json or .parquet")
    ap.add_argument("--fewshot_data", help="few-shot pool (a train split) for arc_ll and gsm8k")
    ap.add_argument("--split", default="", help="split of a --data directory of shards (e.g. test)")
    ap.add_argument("--fewshot_split", default="", help="split of a --fewshot_data directory (e.g. train)")
    flags.add_bool(ap, "--debug", help="tracebacks for user errors too")
    ap.add_argument("--num_fewshot", type=int, help="default: arc_gen 0, arc_ll 25, gsm8k 5")
    ap.add_argument("--limit", type=int, help="the first N questions only")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, help="default: arc_gen 100, gsm8k 256")
    ap.add_argument("--seed", type=int, default=1234, help="few-shot draws")
    ap.add_argument("--out", help="output directory (default: DIR/eval, beside the evaluated checkpoint)")
    ap.add_argument("--tokenizer", help="tokenizer.json, tokenizer.model or a dir (default: DIR's)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dist_timeout_s", type=int, default=3600,
                    help="torchrun: process-group timeout; must outlast the slowest rank's share (ranks wait at the final gather)")
    flags.add_bool(ap, "--no_bos",
                   help="no BOS (the harness with a tokenizer that adds none; Mistral's/Zephyr's add one)")
    flags.add_bool(ap, "--harness_literal_newlines",
                   help="arc_gen: backslash-n (two characters) where the harness's single-quoted YAML has it")
    flags.add_bool(ap, "--harness_four_choices",
                   help="arc_gen: the harness's fixed 'four candidate answers (A, B, C and D)' text for 3- and 5-choice "
                        "questions too (a 5th choice is not shown); with --harness_literal_newlines: its prompt exactly")
    flags.add_bool(ap, "--compile", help="torch.compile the decode step (CUDA graphs on CUDA)")
    flags.add_bool(ap, "--non_legacy", help="template without the '▁' after each EOS")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    for key, value in DEFAULTS[args.task].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.task == "arc_gen" and args.num_fewshot:
        ap.error("arc_gen is 0-shot (arc_challenge_chat)")
    if args.num_fewshot and not args.fewshot_data:
        ap.error(f"{args.num_fewshot}-shot {args.task} needs --fewshot_data (or --num_fewshot 0)")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.model = resolve_model(args.model)     # a run directory means its newest checkpoint
    args.out = args.out or os.path.join(args.model, "eval")
    cuda = args.device.startswith("cuda")
    rank, gpu, world, distributed = parallel.setup(args.dist_timeout_s, cuda=cuda)
    device = f"cuda:{gpu}" if distributed and cuda else args.device
    try:
        questions = load_task(args.task, args.data, args.limit, args.split)
        pool = load_task(args.task, args.fewshot_data, split=args.fewshot_split) if args.num_fewshot else None
        tok, model = load_model(args.model, getattr(torch, args.dtype), device, args.tokenizer)
        mine = shard(questions, rank, world)
        from tqdm import tqdm
        ll = args.task == "arc_ll"           # arc_ll counts scored choices, the others questions
        bar = tqdm(total=sum(len(q["choices"]) for q in mine) if ll else len(mine), desc=args.task,
                   unit="choice" if ll else "q", disable=rank != 0, file=sys.stderr)
        t0 = time.perf_counter()
        records = TASKS[args.task](model, tok, mine, pool=pool, num_fewshot=args.num_fewshot, seed=args.seed,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                   bos=not args.no_bos, legacy=not args.non_legacy, device=device, progress=bar,
                                   literal_newlines=args.harness_literal_newlines,
                                   four_choices=args.harness_four_choices, compile=args.compile)
        bar.close()
    except TaskDataError as e:
        raise SystemExit(f"error: {e}")
    if distributed:
        records = merge(parallel.gather_objects(records))
    elapsed = time.perf_counter() - t0       # rank 0's wall time: it waits for the slowest rank
    if rank == 0:
        s = summarize(args.task, records, elapsed)
        s.update({k: getattr(args, k) for k in ("model", "data", "fewshot_data", "num_fewshot", "seed", "limit",
                                                "batch_size", "max_new_tokens", "dtype")},
                 world_size=world, device=str(device), bos=not args.no_bos, legacy=not args.non_legacy,
                 harness_literal_newlines=args.harness_literal_newlines,
                 harness_four_choices=args.harness_four_choices, compile=args.compile)
        atomic.write_text(os.path.join(args.out, f"{args.task}.jsonl"),
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic.write_text(os.path.join(args.out, f"{args.task}_summary.json"), json.dumps(s, indent=2) + "\n")
        print(one_line(s) + f" -> {os.path.join(args.out, args.task)}.jsonl")
    parallel.shutdown()             # all ranks end together: none closes its connections while rank 0 writes


def cli(argv):
    """main() for the command line: a checkpoint, data or task-file error (file:line) is one line on stderr,
    exit code 2; --debug keeps the traceback."""
    try:
        return main(argv)
    except (data.DataError, CheckpointError) as e:
        if "--debug" in argv:
            raise
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:         # sys.exit("error: ...") (a malformed task file): a user error, the same code
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli(sys.argv[1:])
