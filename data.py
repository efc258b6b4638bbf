"""
Data for nanoIFT: readers for the formats users bring (METHOD §6), SFT/IFT and pairwise examples with
truncation, padding, a deterministic length-grouped sharded batch plan, and the synthetic demo task.
Tokenizers and chat rendering are tokenizer.py. Show what the model will be trained on:
    python data.py --tokenizer CHECKPOINT_DIR_OR_TOKENIZER_FILE --data FILE [--index N] [--json]
"""
import glob
import json
import os
import random
import re
import sys

import numpy as np
import torch

import tasks
from tokenizer import EOS_TEXT, IGNORE, DataError, chat_text, check_messages, load_tokenizer, render_chat

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class MissingDependency(DataError, ImportError):
    """An optional package the input needs (pyarrow for .parquet): a user error, and an ImportError."""


def _string(row, k, where):
    if k not in row:
        raise DataError(f"{where}: missing field '{k}' (fields present: {', '.join(sorted(row))})")
    if not isinstance(row[k], str):
        raise DataError(f"{where}: field '{k}' must be a string, got {type(row[k]).__name__}")
    return row[k]


def conversations(row, where="row"):
    """(messages, rejected messages or None) of a row: chat {"messages"}, preference {"chosen",
    "rejected"} as message lists or as strings with "prompt", or plain {"prompt", "response"}.
    SFT/IFT on a preference row uses its chosen side."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        if isinstance(row.get("chosen"), str) or isinstance(row.get("rejected"), str):
            p = _string(row, "prompt", where)
            return tuple([{"role": "user", "content": p}, {"role": "assistant", "content": _string(row, k, where)}]
                         for k in ("chosen", "rejected"))
        for k in ("chosen", "rejected"):
            if k not in row:
                raise DataError(f"{where}: preference row without field '{k}'")
        return check_messages(row["chosen"], "chosen", where), check_messages(row["rejected"], "rejected", where)
    if "messages" in row:
        return check_messages(row["messages"], "messages", where), None
    if "prompt" in row or "response" in row:
        return [{"role": "user", "content": _string(row, "prompt", where)},
                {"role": "assistant", "content": _string(row, "response", where)}], None
    if "answerKey" in row or (isinstance(row.get("question"), str) and "answer" in row):
        return task_messages(row, where), None
    raise DataError(f"{where}: unknown row kind (fields: {', '.join(sorted(row))}); expected 'messages', "
                     f"'chosen'+'rejected', 'prompt'+'response', or a GSM8K / ARC row")


def task_messages(row, where="row"):
    """A benchmark row in its published format as a chat: GSM8K {"question", "answer"} -> the question, and
    the worked answer ending "#### N"; ARC (AI2 or HF layout, with answerKey) -> eval_gen's arc_gen user
    message, and "The best answer is X." So a benchmark training file is SFT data and, on-policy, a reward
    source (onpolicy.gsm8k_reward / arc_reward read the gold answer from the same row)."""
    try:
        if "answerKey" in row:
            q = tasks.parse_arc(row, where)
            answer = f"{tasks.ARC_PREFILL} {tasks.LETTERS[q['gold']]}."
            return [{"role": "user", "content": tasks.arc_user_message(q)}, {"role": "assistant", "content": answer}]
        q = tasks.parse_gsm8k(row, where)
    except tasks.TaskDataError as e:
        raise DataError(str(e)) from None
    return [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["answer"]}]


def load_records(path):
    """[(where, row)]: .jsonl (and .json holding JSON lines, as HF's to_json writes), .json list, .parquet."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in DATA_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json or .parquet")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependency(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as e:   # pyarrow raises ArrowInvalid / OSError for a truncated or foreign file
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {_first_line(e)})") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is it really {ext}?") from None
    if ext == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{path} row {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    out = []
    for n, line in enumerate(text.split("\n"), 1):   # not splitlines(): U+2028 may sit inside a string
        try:
            out += [(f"{path}:{n}", json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return out


def _first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------------------- sources
# A --data value is a comma-separated mixture of sources, each "PATH" or "PATH:N" (its first N rows in
# file order: the IFT authors take the first 61,136 rows of each dataset). A PATH is a file, a glob, or
# a directory of shards as Hugging Face lays a dataset out (DIR/data/<split>-00000-of-00003-<hash>.parquet),
# where `split` picks the shards of one split. Sources are concatenated in order; the batch plan
# shuffles them together.
_SHARD = re.compile(r"^(.+?)-\d{5}-of-\d{5}")


def split_of(fname):
    """The split a data file belongs to: "train_sft" for HF's train_sft-00000-of-00003-….parquet,
    else the name up to its first dot ("test" for test.jsonl)."""
    base = os.path.basename(fname)
    m = _SHARD.match(base)
    return m.group(1) if m else base.split(".")[0]


def parse_sources(spec):
    """[(path, cap or None)] of "A[:N],B[:N],…". Only an all-digit suffix is a cap."""
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"(.*):(\d+)", part)
        path, cap = (m.group(1), int(m.group(2))) if m else (part, None)
        if not path:
            raise DataError(f"data {spec!r}: empty source in the comma-separated list")
        if cap == 0:
            raise DataError(f"{part}: a row cap must be at least 1")
        out.append((path, cap))
    return out


def source_files(path, split=""):
    """The data files of one source, in read order (sorted names: HF's shard numbers sort right)."""
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        return files
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or directory")
    root = os.path.join(path, "data") if os.path.isdir(os.path.join(path, "data")) else path
    files = sorted(os.path.join(root, f) for f in os.listdir(root)
                   if f.lower().endswith(DATA_SUFFIXES) and os.path.isfile(os.path.join(root, f)))
    splits = sorted({split_of(f) for f in files})
    if not files:
        raise DataError(f"{root}: no .jsonl, .json or .parquet files in this directory")
    if split:
        files = [f for f in files if split_of(f) == split]
        if not files:
            raise DataError(f"{root}: no files of split '{split}' (splits here: {', '.join(splits)})")
    elif len(splits) > 1:
        raise DataError(f"{root}: holds the splits {', '.join(splits)}; pick one with --split")
    return files


def read_source(spec, split=""):
    """([(where, row)] of every source in order, [{"source", "files", "rows"}] per source). A capped
    source reads only the shards it needs. A source, or a file, without a row is an error."""
    records, sources = [], []
    for path, cap in parse_sources(spec):
        rows, files = [], source_files(path, split)
        for n, f in enumerate(files, 1):
            got = load_records(f)
            if not got:
                raise DataError(f"{f}: empty file (no rows)")
            rows += got
            if cap is not None and len(rows) >= cap:
                break
        records += rows[:cap]
        sources.append({"source": path if cap is None else f"{path}:{cap}", "files": n, "rows": len(rows[:cap])})
    return records, sources


def _located(src, split=""):
    """(records, stats extras): a --data value (see read_source) or a list of rows."""
    if isinstance(src, (str, os.PathLike)):
        records, sources = read_source(os.fspath(src), split)
        return records, {"sources": sources}
    return [(f"row {i}", r) for i, r in enumerate(src)], {}


# ---------------------------------------------------------------------------- the authors' conventions
def with_system(msgs):
    """The IFT authors' loader puts an empty system message first when a conversation has none."""
    return msgs if msgs[0]["role"] == "system" else [{"role": "system", "content": ""}] + msgs


def prompt_key(row, msgs):
    """The key the authors' loader files an example under: the row's "prompt" string, else the first
    user message."""
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    return next((m["content"] for m in msgs if m["role"] == "user"), "")


def dedup_by_prompt(items):
    """items [(where, row, *conversations)] with one per prompt: the authors key examples by prompt
    in a dict, so the *last* row of a prompt wins, at the place of the first."""
    keep = {}
    for it in items:
        keep[prompt_key(it[1], it[2])] = it
    return list(keep.values())


def read_rows(path, split=""):
    """All rows of a --data value (a file, glob, directory or mixture), each checked (an error names
    file:line or 'file row N', and the field)."""
    rows = read_source(os.fspath(path), split)[0]
    for where, r in rows:
        conversations(r, where)
    return [r for _, r in rows]


def check_rows(spec, split="", pairwise=False, prompt_from_chosen=False) -> bool:
    """Every row of a --data value read and checked as the objective will load it (pairwise: chosen and
    rejected with one prompt); an error names file:line and the field. True if the rows hold preference pairs
    that a non-pairwise objective would train on by their chosen side."""
    chosen_only = False
    for where, row in read_source(os.fspath(spec), split)[0]:
        if pairwise:
            _pair(row, where, prompt_from_chosen)
        else:
            chosen_only |= conversations(row, where)[1] is not None
    return chosen_only


def _render(where, tok, msgs, **kw):
    try:
        return render_chat(tok, msgs, **kw)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------- examples
def _progress(items, on, desc):
    """items, through a tqdm bar when `on` and stderr is a terminal (tokenizing 200k conversations takes
    minutes; a redirected log would only collect the bar's redraws)."""
    if not on or not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit=" rows", dynamic_ncols=True, leave=False)


def load_sft(src, tok, max_length=None, *, last_turn_only=False, legacy=True, split="", empty_system=False,
             dedup_prompts=False, progress=False):
    """SFT/IFT examples {"input_ids", "labels"} from a --data value (read_source) or a list of rows, and
    counts. Too long: keep the start; an example left without a supervised token is dropped (and
    counted). empty_system, dedup_prompts: the authors' conventions (with_system, dedup_by_prompt)."""
    records, extra = _located(src, split)
    items = [(w, r, conversations(r, w)[0]) for w, r in records]   # check all rows first
    out, st = [], {"rows": len(items), "examples": 0, "truncated": 0, "dropped": 0, "literal_eos": 0, **extra}
    if dedup_prompts:
        items = dedup_by_prompt(items)
        st["duplicates"] = st["rows"] - len(items)
    for where, _, msgs in _progress(items, progress, "tokenizing"):
        msgs = with_system(msgs) if empty_system else msgs
        st["literal_eos"] += any(EOS_TEXT in m["content"] for m in msgs)
        ids, labels = _render(where, tok, msgs, last_turn_only=last_turn_only, legacy=legacy)
        if max_length and len(ids) > max_length:
            ids, labels, st["truncated"] = ids[:max_length], labels[:max_length], st["truncated"] + 1
        if all(x == IGNORE for x in labels):
            st["dropped"] += 1
        else:
            out.append({"input_ids": ids, "labels": labels})
    st["examples"] = len(out)
    return out, st


def _pair(row, where, prompt_from_chosen=False):
    """(chosen, rejected) messages. prompt_from_chosen (the authors' loader): the prompt is chosen[:-1]
    and only rejected's last message is used, so rows whose two sides differ before the answer load."""
    c, r = conversations(row, where)
    if r is None:
        raise DataError(f"{where}: a pairwise objective needs 'chosen' and 'rejected' fields")
    for name, m in (("chosen", c), ("rejected", r)):
        if m[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message of '{name}' must be the assistant's answer")
    if prompt_from_chosen:
        r = c[:-1] + r[-1:]
    if c[:-1] != r[:-1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' have different prompts (messages before the answer)")
    return c, r


def load_pairs(src, tok, max_length=None, max_prompt_length=None, *, legacy=True, split="", empty_system=False,
               dedup_prompts=False, prompt_from_chosen=False, progress=False):
    """Pairwise examples {"prompt_ids", "chosen_ids", "rejected_ids"}: the prompt is the conversation
    before the final assistant turn plus the generation prompt; an answer is that turn's content ids
    and its EOS (all supervised). Too long (prompt + longer answer > max_length), DPO-repo style: keep
    the prompt's start up to max_prompt_length (None: leave it), then cut the answers to fit.
    empty_system, dedup_prompts, prompt_from_chosen: the authors' conventions (see load_sft, _pair)."""
    records, extra = _located(src, split)
    items = [(w, row, *_pair(row, w, prompt_from_chosen)) for w, row in records]
    out, st = [], {"rows": len(items), "examples": 0, "truncated": 0, "dropped": 0, "literal_eos": 0, **extra}
    if dedup_prompts:
        items = dedup_by_prompt(items)
        st["duplicates"] = st["rows"] - len(items)
    for where, _, c, r in _progress(items, progress, "tokenizing"):
        c, r = (with_system(c), with_system(r)) if empty_system else (c, r)
        st["literal_eos"] += any(EOS_TEXT in m["content"] for m in c + r[-1:])
        prompt = _render(where, tok, c[:-1], add_generation_prompt=True, legacy=legacy)[0]
        ans = []
        for m in (c, r):
            ids, labels = _render(where, tok, m, last_turn_only=True, legacy=legacy)
            sup = [i for i, x in enumerate(labels) if x != IGNORE]
            assert ids[:len(prompt)] == prompt and sup[0] == len(prompt), where
            ans.append(ids[len(prompt):sup[-1] + 1])
        if max_length and len(prompt) + max(map(len, ans)) > max_length:
            st["truncated"] += 1
            prompt = prompt if max_prompt_length is None else prompt[:max_prompt_length]
            ans = [a[:max(0, max_length - len(prompt))] for a in ans]
        if all(ans):
            out.append({"prompt_ids": prompt, "chosen_ids": ans[0], "rejected_ids": ans[1]})
        else:
            st["dropped"] += 1
    st["examples"] = len(out)
    return out, st


# ---------------------------------------------------------------------------- batching
def collate(examples, pad_id):
    """Right padding. Labels are -100 and the mask 0 past each row's length (never from ids == pad)."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        assert len(e["labels"]) == n, "input_ids and labels differ in length"
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def to_device(batch, device):
    """A collated batch (possibly with nested batches, e.g. KTO's KL rows) moved to `device`."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def collate_pairs(examples, pad_id):
    """[2B, T]: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected; labels -100 on prompt and pad."""
    return collate([{"input_ids": e["prompt_ids"] + e[k], "labels": [IGNORE] * len(e["prompt_ids"]) + e[k]}
                    for k in ("chosen_ids", "rejected_ids") for e in examples], pad_id)


def pair_batch(examples, idx, pad_id, kto: bool = False):
    """collate_pairs of examples[idx]. KTO adds mismatched rows for its KL estimate: prompt i with the
    chosen answer of dataset example i+1 (fixed pairs, so precomputed reference log-probs stay valid)."""
    batch = collate_pairs([examples[i] for i in idx], pad_id)
    if kto:
        n = len(examples)
        batch["kl"] = collate([{"input_ids": examples[i]["prompt_ids"] + examples[(i + 1) % n]["chosen_ids"],
                                "labels": [IGNORE] * len(examples[i]["prompt_ids"]) + examples[(i + 1) % n]["chosen_ids"]}
                               for i in idx], pad_id)
    return batch


class Plan(list):
    """batch_plan's result, a list over optimizer steps; .dropped = examples left out this epoch."""
    dropped = 0


def batch_plan(lengths, micro_batch_size, grad_accum, world_size, rank, seed, epoch, group_by_length=True,
               megabatch=8):
    """plan[step][micro_step] = this rank's example indices for one epoch. The order comes from
    (seed, epoch) alone, so all ranks agree; the final incomplete global batch (micro*accum*world) is
    dropped (plan.dropped). A micro-step is a block of micro*world consecutive indices, rank r taking
    the r-th slice, so the union over ranks is what one process with micro*world gets.
    group_by_length: sort by length inside chunks of `megabatch` global batches, then shuffle the
    blocks: little padding, random order. Resume at (epoch, step) = batch_plan(..., epoch)[step:]."""
    assert micro_batch_size > 0 and grad_accum > 0 and 0 <= rank < world_size
    per_micro = micro_batch_size * world_size
    n_steps = len(lengths) // (per_micro * grad_accum)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))[:n_steps * per_micro * grad_accum]
    if group_by_length and n_steps:
        lens, M = np.asarray(lengths), megabatch * per_micro * grad_accum
        order = np.concatenate([c[np.argsort(-lens[c], kind="stable")] for c in np.split(order, range(M, len(order), M))])
    blocks = [order[i:i + per_micro] for i in range(0, len(order), per_micro)]
    if group_by_length:
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    lo = rank * micro_batch_size
    plan = Plan([[blocks[s * grad_accum + a][lo:lo + micro_batch_size].tolist() for a in range(grad_accum)]
                 for s in range(n_steps)])
    plan.dropped = len(lengths) - len(order)
    return plan


# ---------------------------------------------------------------------------- synthetic task
SYSTEM_PROMPTS = ["You are a careful calculator.", "Answer with the result only."]
_QUESTION = re.compile(r"Add (\d+) and (\d+)\.|(Reverse|Sort) the list ((?:\d )*\d)\.")


def _qa(rng):
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"Add {a} and {b}.", f"{a} + {b} = {a + b}"
    xs = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    verb, ys = ("Reverse", xs[::-1]) if kind == 1 else ("Sort", sorted(xs))
    return f"{verb} the list {' '.join(xs)}.", " ".join(ys)


def synthetic_task(n, seed):
    """n chat rows with short, exactly checkable answers: adding two numbers < 100 with a worked
    answer, reversing or sorting 3-6 digits. About 1 in 4 has a system prompt, 1 in 10 two turns."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.25 else []
        for _ in range(2 if rng.random() < 0.1 else 1):
            q, a = _qa(rng)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": msgs})
    return rows


def synthetic_pairs(n, seed):
    """Preference rows over synthetic_task(n, seed): chosen = the right answer, rejected = one digit of
    the final answer changed; "messages" repeats chosen (as in ultrafeedback_binarized)."""
    rng, rows = random.Random(f"{seed}-pairs"), []
    for r in synthetic_task(n, seed):
        good = r["messages"][-1]["content"]
        i = rng.choice([i for i, ch in enumerate(good) if ch.isdigit() and i > good.rfind("=")])
        bad = good[:i] + str((int(good[i]) + rng.randint(1, 9)) % 10) + good[i + 1:]
        rows.append({"prompt": r["messages"][-2]["content"], "chosen": r["messages"], "messages": r["messages"],
                     "rejected": r["messages"][:-1] + [{"role": "assistant", "content": bad}]})
    return rows


def check_answer(row_or_prompt, response_text, partial=False):
    """Score a response to the last synthetic question of a row (dict) or of a prompt text (a decoded
    prompt works): 1.0 if the final answer is exactly right, else 0.0; partial=True: the fraction of
    digit positions right (numbers aligned from the right). Usable as a reward function."""
    text = row_or_prompt
    if isinstance(row_or_prompt, dict):
        text = [m["content"] for m in conversations(row_or_prompt)[0] if m["role"] == "user"][-1]
    found = list(_QUESTION.finditer(text))
    if not found:
        raise ValueError(f"no synthetic-task question in {text[-80:]!r}")
    a, b, verb, xs = found[-1].groups()
    if a is not None:   # the number last in the response
        want, got = str(int(a) + int(b))[::-1], (re.findall(r"\d+", response_text) or [""])[-1][::-1]
    else:
        xs = xs.split()
        want, got = "".join(xs[::-1] if verb == "Reverse" else sorted(xs)), "".join(re.findall(r"\d", response_text))
    if not partial:
        return float(want == got)
    return sum(x == y for x, y in zip(want, got)) / max(len(want), len(got))


def corpus_text(rows):
    """Template text of every conversation of rows (both sides of preference rows), for train_tokenizer."""
    return [chat_text(m, add_generation_prompt=True).replace(EOS_TEXT, "\n")
            for r in rows for m in conversations(r) if m is not None]


# ---------------------------------------------------------------------------- inspection
def show(tok, ids, labels):
    """The text of ids with the supervised runs between ⟦ ⟧."""
    out, i = [], 0
    while i < len(ids):
        j, sup = i, labels[i] != IGNORE
        while j < len(ids) and (labels[j] != IGNORE) == sup:
            j += 1
        out.append(f"⟦{tok.text_of(ids[i:j])}⟧" if sup else tok.text_of(ids[i:j]))
        i = j
    return "".join(out)


def main(argv=None):
    from infra import flags
    ap = flags.Parser(description="Show one row as the model will be trained on it (the "
                                 "tokenizer's chat template, or Zephyr; supervised spans between ⟦ ⟧; "
                                 "preference rows: the chosen side).")
    ap.add_argument("--tokenizer", required=True, help="checkpoint directory, tokenizer.json or tokenizer.model")
    ap.add_argument("--data", required=True, help=".jsonl, .json or .parquet file, glob, directory of shards, "
                    "or a comma-separated mixture of them, each optionally PATH:N (its first N rows)")
    ap.add_argument("--split", default="", help="split of a directory of shards (e.g. train_sft)")
    ap.add_argument("--index", type=int, default=0, help="row number, from 0")
    flags.add_bool(ap, "--json", help='print {"input_ids": [...], "labels": [...]}')
    flags.add_bool(ap, "--last_turn_only", help="supervise only the last assistant turn")
    flags.add_bool(ap, "--non_legacy", help="no dummy-prefix space after each EOS")
    a = ap.parse_args(argv)
    try:
        tok, rows = load_tokenizer(a.tokenizer), read_source(a.data, a.split)[0]
        for where, row in rows:   # every row checked: the command doubles as a validator of a data file
            conversations(row, where)
        if not 0 <= a.index < len(rows):
            raise ValueError(f"--index {a.index} is out of range: {a.data} has {len(rows)} rows")
        where, row = rows[a.index]
        msgs, rejected = conversations(row, where)
        ids, labels = _render(where, tok, msgs, last_turn_only=a.last_turn_only, legacy=not a.non_legacy)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)                  # a user error, as in train.py and eval_gen.py
    if a.json:
        print(json.dumps({"input_ids": ids, "labels": labels}))
        return
    kind = "preference row, chosen side" if rejected is not None else "chat row"
    template = getattr(tok, "template_name", None) or "Zephyr (sentencepiece)"
    print(f"{where}: {kind}; {len(ids)} tokens, {sum(x != IGNORE for x in labels)} supervised (between ⟦ ⟧); "
          f"template: {template}")
    print(show(tok, ids, labels))


if __name__ == "__main__":
    main()
