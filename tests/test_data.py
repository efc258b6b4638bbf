"""Tests for data.py: METHOD §5 token ids on the real Mistral v0.1 tokenizer (literal ids derived by hand
from raw sentencepiece calls, optionally cross-checked against transformers), readers and their
errors, examples and truncation, batching, the synthetic task and the inspection command."""
import builtins
import importlib.util
import json
import os

import pytest
import torch

import data
import tokenizer

U, A, S = "user", "assistant", "system"
X = -100


def msg(role, content):
    return {"role": role, "content": content}


def _mistral_path():
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    return p if os.path.isfile(p) else None


@pytest.fixture(scope="module")
def mistral():
    p = _mistral_path()
    if p is None:
        pytest.skip("mistral-common (ships Mistral-7B v0.1's tokenizer.model.v1) is not installed: "
                    "pip install --no-deps mistral-common")
    return tokenizer.Tokenizer(p)


@pytest.fixture(scope="module")
def syn_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("syntok")
    tok = tokenizer.train_tokenizer(data.corpus_text(data.synthetic_task(400, 0)), str(d / "tok"), 400)
    assert sorted(os.listdir(d)) == ["tok.model"]  # written atomically, no temp files left
    return tok


def supervised(ids, labels):
    assert len(ids) == len(labels)
    assert all(l == X or l == i for i, l in zip(ids, labels))  # a label is its own position's id
    return [i for i, l in zip(ids, labels) if l != X]


# ---------------------------------------------------------------------------- METHOD §5, real tokenizer
# Pieces (ids from raw sentencepiece): "▁<|system|>\n" 523 28766 6574 28766 28767 13; after every EOS
# the piece starts with "▁" 28705 and "\n" 13 (byte <0x0A>); "<|user|>" mid-text 28789 28766 1838
# 28766 28767; "<|assistant|>" 28789 28766 489 11143 28766 28767.
SINGLE = [msg(S, "You are a helpful assistant."), msg(U, "What is 2+3?"), msg(A, "2+3 = 5.")]
SINGLE_IDS = [1, 523, 28766, 6574, 28766, 28767, 13, 1976, 460, 264, 10865, 13892, 28723, 2,
              28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 3195, 349, 28705, 28750, 28806, 28770, 28804, 2,
              28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 28750, 28806, 28770, 327, 28705, 28782, 28723, 2,
              28705, 13]
SINGLE_ANSWER = [28750, 28806, 28770, 327, 28705, 28782, 28723, 2]   # "2+3 = 5." + EOS

MULTI = [msg(U, "Hi"), msg(A, "Hello! How can I help?"), msg(U, "Tell me a joke."), msg(A, "No.")]
MULTI_IDS = [1, 523, 28766, 1838, 28766, 28767, 13, 23809, 2,
             28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 16230, 28808, 1602, 541, 315, 1316, 28804, 2,
             28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 22467, 528, 264, 13015, 28723, 2,
             28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 2501, 28723, 2,
             28705, 13]
MULTI_ANSWERS = [[16230, 28808, 1602, 541, 315, 1316, 28804, 2], [2501, 28723, 2]]

# empty system, two leading spaces, a literal "</s>" in user and assistant content, an emoji outside
# the vocabulary (🦜: 4 byte tokens) and one inside it (😀 30575), an empty assistant answer.
EDGE = [msg(S, ""), msg(U, "  hi </s>x 🦜"), msg(A, " ok</s>😀 done"), msg(U, "again"), msg(A, "")]
EDGE_IDS = [1, 523, 28766, 6574, 28766, 28767, 13, 2,
            28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 28705, 12014, 28705, 2,
            1318, 28705, 243, 162, 169, 159, 2,
            28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 3614, 2,
            28705, 30575, 2203, 2,
            28705, 13, 28789, 28766, 1838, 28766, 28767, 13, 27159, 2,
            28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 2,
            28705, 13]
# " ok" EOS "😀 done" EOS (the literal "</s>" is the EOS id, supervised inside the answer), then "" EOS
EDGE_ANSWERS = [3614, 2, 28705, 30575, 2203, 2, 2]
GEN_PROMPT = [28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13]   # "\n<|assistant|>\n"


def test_mistral_tokenizer_basics(mistral):
    assert (mistral.vocab_size, mistral.unk_id, mistral.bos_id, mistral.eos_id) == (32000, 0, 1, 2)
    assert mistral.pad_id == 0 and mistral.pad_id != mistral.eos_id
    assert mistral.encode("\n") == [28705, 13]
    assert mistral.encode("</s>") != [2]    # the text "</s>" is spelled out: EOS goes in by id only
    assert mistral.decode(mistral.encode("Hello world")) == "Hello world"


def test_single_turn_exact_ids_and_labels(mistral):
    ids, labels = tokenizer.render_chat(mistral, SINGLE)
    assert ids == SINGLE_IDS
    assert labels == [X] * 39 + SINGLE_ANSWER + [X, X]
    assert ids.count(1) == 1 and ids[0] == 1
    assert labels[ids.index(2, 40)] == 2     # the answer's EOS is supervised
    assert [l for l in labels if l == 2] == [2]  # the system/user EOS are not


def test_multi_turn_exact_ids_and_labels(mistral):
    ids, labels = tokenizer.render_chat(mistral, MULTI)
    assert ids == MULTI_IDS
    assert supervised(ids, labels) == MULTI_ANSWERS[0] + MULTI_ANSWERS[1]
    assert labels[18:26] == MULTI_ANSWERS[0] and labels[49:52] == MULTI_ANSWERS[1]
    assert labels[:18] == [X] * 18 and labels[26:49] == [X] * 23 and labels[52:] == [X, X]
    ids2, labels2 = tokenizer.render_chat(mistral, MULTI, last_turn_only=True)
    assert ids2 == MULTI_IDS and labels2 == [X] * 49 + MULTI_ANSWERS[1] + [X, X]


def test_edge_cases_exact_ids_and_labels(mistral):
    ids, labels = tokenizer.render_chat(mistral, EDGE)
    assert ids == EDGE_IDS
    assert supervised(ids, labels) == EDGE_ANSWERS
    assert labels[36:42] == EDGE_ANSWERS[:6] and labels[61] == 2 and ids.count(1) == 1 and len(ids) == 64
    assert sum(l != X for l in labels) == 7


def test_generation_prompt(mistral):
    ids, labels = tokenizer.render_chat(mistral, MULTI[:3], add_generation_prompt=True)
    assert ids == MULTI_IDS[:49] and ids[-9:] == GEN_PROMPT and labels == [X] * 49
    assert tokenizer.render_chat(mistral, [], add_generation_prompt=True)[0] == [1, 523, 28766, 489, 11143, 28766, 28767, 13]


def test_non_legacy_drops_prefix_after_eos(mistral):
    ids, labels = tokenizer.render_chat(mistral, SINGLE, legacy=False)
    assert ids == [i for k, i in enumerate(SINGLE_IDS) if not (i == 28705 and SINGLE_IDS[k - 1] == 2)]
    assert supervised(ids, labels) == SINGLE_ANSWER
    # text right after a literal "</s>": "b" (28726) without the prefix, not "▁b" (287)
    m = [msg(U, "a"), msg(A, "x</s>b 😀")]
    ids, labels = tokenizer.render_chat(mistral, m, legacy=False)
    assert ids == [1, 523, 28766, 1838, 28766, 28767, 13, 28708, 2, 13, 28789, 28766, 489, 11143, 28766, 28767, 13,
                   28744, 2, 28726, 28705, 30575, 2, 13]
    assert supervised(ids, labels) == [28744, 2, 28726, 28705, 30575, 2]
    assert tokenizer.render_chat(mistral, m)[0][20] == 287


def test_cross_check_transformers(mistral, tmp_path):
    """Extra: the Hugging Face tokenizer on the hand-rendered Zephyr text gives the same ids
    (EDGE without its double space: HF's fast tokenizer merges "▁▁" where sentencepiece does not)."""
    transformers = pytest.importorskip("transformers")
    os.symlink(mistral.path, tmp_path / "tokenizer.model")
    edge = [dict(m, content=m["content"].replace("  ", " ")) for m in EDGE]
    for legacy in (True, False):
        try:
            hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=legacy)
        except Exception as e:  # pragma: no cover - depends on the installed transformers
            pytest.skip(f"transformers cannot load a bare tokenizer.model: {e}")
        for m in (SINGLE, MULTI, edge, [msg(U, "a"), msg(A, "x</s>b 😀")]):
            want = hf(tokenizer.chat_text(m))["input_ids"]
            want = want if want[:1] == [1] else [1] + want
            assert tokenizer.render_chat(mistral, m, legacy=legacy)[0] == want, (legacy, m)


class MergingTok:
    """Characters as ids, except "\\n" followed by "o" merges into one token."""
    bos_id, eos_id = 1, 2

    def encode(self, text, dummy_prefix=True):
        out = [ord(c) for c in text.replace("\no", "\x00")]
        return [999 if i == 0 else i for i in out]


def test_label_boundary_merge_is_an_error():
    with pytest.raises(ValueError, match="merges the assistant header"):
        tokenizer.render_chat(MergingTok(), [msg(U, "q"), msg(A, "ok")])
    ids, labels = tokenizer.render_chat(MergingTok(), [msg(U, "q"), msg(A, "yes")])
    assert supervised(ids, labels) == [ord("y"), ord("e"), ord("s"), 2]


def test_supervised_text_is_the_answers(syn_tok):
    for row in data.synthetic_task(50, 3):
        for legacy in (True, False):
            ids, labels = tokenizer.render_chat(syn_tok, row["messages"], legacy=legacy)
            sup = supervised(ids, labels)
            answers = [m["content"] for m in row["messages"] if m["role"] == A]
            assert sup.count(syn_tok.eos_id) == len(answers) and sup[-1] == syn_tok.eos_id
            assert syn_tok.decode(sup).replace(" ", "") == "".join(answers).replace(" ", "")
            assert ids.count(syn_tok.bos_id) == 1


# ---------------------------------------------------------------------------- synthetic task, tokenizer
def test_train_tokenizer_settings(syn_tok):
    sp = syn_tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert syn_tok.pad_id == 0 != syn_tok.eos_id and 300 < syn_tok.vocab_size <= 400
    assert [sp.id_to_piece(i) for i in syn_tok.encode("12345")] == ["▁", "1", "2", "3", "4", "5"]  # split digits
    assert [sp.id_to_piece(i) for i in syn_tok.encode("\n")] == ["▁", "<0x0A>"]   # newline: byte fallback
    assert syn_tok.decode(syn_tok.encode("a  b 🦜")) == "a  b 🦜"   # whitespace kept, bytes for unknowns
    ids = syn_tok.encode("<|user|>")
    assert len(ids) > 1 and syn_tok.decode(ids) == "<|user|>"      # markers are ordinary text


def test_synthetic_task_and_checker(syn_tok):
    rows = data.synthetic_task(300, 7)
    assert rows == data.synthetic_task(300, 7) and rows != data.synthetic_task(300, 8)
    assert any(r["messages"][0]["role"] == S for r in rows) and any(len(r["messages"]) >= 4 for r in rows)
    for r in rows:
        ans = r["messages"][-1]["content"]
        assert data.check_answer(r, ans) == 1.0
        assert len(syn_tok.encode(ans)) < 20
        prompt = tokenizer.render_chat(syn_tok, r["messages"][:-1], add_generation_prompt=True)[0]
        assert data.check_answer(syn_tok.decode(prompt), ans) == 1.0    # from the decoded prompt too
    assert data.check_answer("Add 47 and 385.", "47 + 385 = 432") == 1.0
    assert data.check_answer("Add 47 and 385.", "47 + 385 = 422") == 0.0
    assert data.check_answer("Add 47 and 385.", "47 + 385 = 422", partial=True) == pytest.approx(2 / 3)
    assert data.check_answer("Reverse the list 1 2 3.", "3 2 1") == 1.0
    assert data.check_answer("Sort the list 3 1 2.", "1 3 2", partial=True) == pytest.approx(1 / 3)
    assert data.check_answer("Sort the list 3 1 2.", "", partial=True) == 0.0
    with pytest.raises(ValueError, match="no synthetic-task question"):
        data.check_answer("What is love?", "1")
    pairs = data.synthetic_pairs(100, 7)
    for p, r in zip(pairs, rows):
        assert p["chosen"] == r["messages"] and p["chosen"][:-1] == p["rejected"][:-1]
        assert data.check_answer(p, p["rejected"][-1]["content"]) == 0.0


# ---------------------------------------------------------------------------- examples, truncation
def test_load_sft_truncation_and_drops(syn_tok):
    rows = [{"messages": [msg(U, "Sort the list 3 1 2."), msg(A, "1 2 3")]},
            {"messages": [msg(U, "Reverse the list 1 2 3 4 5 6."), msg(A, "6 5 4 3 2 1")]},
            {"messages": [msg(U, "no answer here")]}]
    full = [tokenizer.render_chat(syn_tok, r["messages"]) for r in rows]
    n0 = full[0][1].index(syn_tok.eos_id)        # position of the first row's answer EOS
    L = n0 + 1                                   # keeps row 0's whole answer, cuts its trailing newline
    assert L < len(full[1][0]) and full[1][1][:L] == [X] * L   # row 1 keeps no supervised token
    ex, st = data.load_sft(rows, syn_tok, max_length=L)
    assert st == {"rows": 3, "truncated": 2, "dropped": 2, "literal_eos": 0, "examples": 1}
    assert ex == [{"input_ids": full[0][0][:L], "labels": full[0][1][:L]}]     # keeps the start
    ex, st = data.load_sft(rows, syn_tok)
    assert (st["truncated"], st["dropped"], len(ex)) == (0, 1, 2)


def test_load_pairs_and_truncation(syn_tok):
    c = [msg(S, "Answer with the result only."), msg(U, "Add 4 and 5."), msg(A, "4 + 5 = 9")]
    row = {"chosen": c, "rejected": c[:-1] + [msg(A, "4 + 5 = 19")]}
    (e,), st = data.load_pairs([row], syn_tok)
    prompt = tokenizer.render_chat(syn_tok, c[:-1], add_generation_prompt=True)[0]
    full, labels = tokenizer.render_chat(syn_tok, c)
    assert e["prompt_ids"] == prompt and prompt + e["chosen_ids"] == full[:len(prompt) + len(e["chosen_ids"])]
    assert e["chosen_ids"] == supervised(full, labels) and e["chosen_ids"][-1] == syn_tok.eos_id
    assert e["rejected_ids"][-1] == syn_tok.eos_id and len(e["rejected_ids"]) == len(e["chosen_ids"]) + 1
    P, R = len(prompt), len(e["rejected_ids"])
    (t,), st = data.load_pairs([row], syn_tok, max_length=P + R - 1, max_prompt_length=P - 3)
    assert st["truncated"] == 1 and t["prompt_ids"] == prompt[:P - 3]        # prompt start kept first
    assert t["chosen_ids"] == e["chosen_ids"] and t["rejected_ids"] == e["rejected_ids"][:R + 2]
    (t,), st = data.load_pairs([row], syn_tok, max_length=P + 2)             # prompt untouched, answers cut
    assert t["prompt_ids"] == prompt and t["chosen_ids"] == e["chosen_ids"][:2] and st["truncated"] == 1
    ex, st = data.load_pairs([row, row], syn_tok, max_length=P)
    assert ex == [] and (st["dropped"], st["truncated"]) == (2, 2)
    # plain-string preference rows
    (s,), _ = data.load_pairs([{"prompt": "Add 4 and 5.", "chosen": "4 + 5 = 9", "rejected": "4 + 5 = 19"}], syn_tok)
    assert s["chosen_ids"] == data.load_pairs([{"chosen": c[1:], "rejected": row["rejected"][1:]}], syn_tok)[0][0]["chosen_ids"]


# ---------------------------------------------------------------------------- batching
def test_collate_padding_never_supervised():
    ex = [{"input_ids": [1, 5, 0, 2], "labels": [X, X, 0, 2]}, {"input_ids": [1, 7], "labels": [X, 7]}]
    b = data.collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 0, 2], [1, 7, 0, 0]]
    assert b["labels"].tolist() == [[X, X, 0, 2], [X, 7, X, X]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]     # from lengths, not ids == pad
    p = data.collate_pairs([{"prompt_ids": [1, 9], "chosen_ids": [4, 2], "rejected_ids": [5, 6, 2]}], pad_id=0)
    assert p["input_ids"].tolist() == [[1, 9, 4, 2, 0], [1, 9, 5, 6, 2]]
    assert p["labels"].tolist() == [[X, X, 4, 2, X], [X, X, 5, 6, 2]]
    assert p["input_ids"].dtype == torch.long


def _plans(n, micro, accum, world, epoch, seed=0, **kw):
    lengths = [(i * 37) % 101 + 1 for i in range(n)]
    return lengths, [data.batch_plan(lengths, micro, accum, world, r, seed, epoch, **kw) for r in range(world)]


@pytest.mark.parametrize("group", [True, False])
def test_batch_plan_ranks_cover_each_example_once(group):
    for n in (96, 103):
        _, plans = _plans(n, micro=4, accum=3, world=2, epoch=1, group_by_length=group)
        seen = [i for p in plans for step in p for mb in step for i in mb]
        assert len(plans[0]) == n // 24 and plans[0].dropped == n % 24
        assert len(seen) == len(set(seen)) == n - n % 24
        assert all(len(mb) == 4 for p in plans for step in p for mb in step)
        assert not set(i for step in plans[0] for mb in step for i in mb) & set(i for step in plans[1] for mb in step for i in mb)


@pytest.mark.parametrize("group", [True, False])
def test_batch_plan_ddp_equals_single_process(group):
    _, two = _plans(100, micro=2, accum=3, world=2, epoch=0, group_by_length=group)
    _, (one,) = _plans(100, micro=4, accum=3, world=1, epoch=0, group_by_length=group)
    for s in range(len(one)):
        for a in range(3):
            assert sorted(two[0][s][a] + two[1][s][a]) == sorted(one[s][a])


def test_batch_plan_resume_and_shuffle():
    lengths, _ = _plans(200, 4, 2, 2, 0)
    run = lambda e: data.batch_plan(lengths, 4, 2, 2, 1, 5, e)
    uninterrupted = [b for e in range(3) for b in run(e)]
    spe = len(run(0))
    stop = spe + 3                                   # stopped at epoch 1, step 3
    epoch, k = divmod(stop, spe)
    resumed = uninterrupted[:stop] + [b for e in range(epoch, 3) for b in run(e)[(k if e == epoch else 0):]]
    assert resumed == uninterrupted
    assert run(0) != run(1) and run(0) == data.batch_plan(lengths, 4, 2, 2, 1, 5, 0)
    assert run(0) != data.batch_plan(lengths, 4, 2, 2, 1, 6, 0)


def test_group_by_length_cuts_padding():
    lengths, _ = _plans(512, 4, 2, 1, 0)
    def waste(group):
        p = data.batch_plan(lengths, 4, 2, 1, 0, 0, 0, group_by_length=group)
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for st in p for mb in st)
    assert waste(True) < 0.2 * waste(False)
    # micro-batches are sorted inside a megabatch but then shuffled: the longest lengths of
    # consecutive micro-batches go down about half the time, not nearly always
    p = data.batch_plan(lengths, 4, 2, 1, 0, 0, 0)
    tops = [max(lengths[i] for i in mb) for st in p for mb in st]
    assert 0.25 < sum(a >= b for a, b in zip(tops, tops[1:])) / (len(tops) - 1) < 0.75


# ---------------------------------------------------------------------------- readers and errors
def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


CHAT = json.dumps({"prompt": "q", "messages": [msg(U, "q"), msg(A, "a")]})


def test_readers_formats(tmp_path):
    rows = [json.loads(CHAT), {"prompt": "p", "response": "r"},
            {"prompt": "p", "chosen": "c", "rejected": "r"},
            {"chosen": [msg(U, "p\u2028x"), msg(A, "c")], "rejected": [msg(U, "p\u2028x"), msg(A, "r")]}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    a = data.read_rows(write(tmp_path / "a.jsonl", [lines[0], "", *lines[1:]]))
    b = data.read_rows(write(tmp_path / "b.json", [json.dumps(rows)]))
    c = data.read_rows(write(tmp_path / "c.json", lines))            # JSON lines named .json (HF to_json)
    assert a == b == c == rows
    assert [data.conversations(r)[1] is None for r in rows] == [True, True, False, False]
    assert data.conversations(rows[1])[0] == [msg(U, "p"), msg(A, "r")]
    assert data.conversations(rows[2])[1] == [msg(U, "p"), msg(A, "r")]


@pytest.mark.parametrize("line, match", [
    ('{"messages": [', "invalid JSON"),
    ('{"prompt": "only a prompt"}', "missing field 'response'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"messages\[0\].role is 'bot'"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', r"messages\[0\].content must be a string"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] has no 'content'"),
    ('{"chosen": [{"role": "user", "content": "x"}]}', "without field 'rejected'"),
    ('{"text": "x"}', "unknown row kind"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, match):
    path = write(tmp_path / "bad.jsonl", [CHAT, "", line])
    with pytest.raises(ValueError, match=match) as e:
        data.read_rows(path)
    assert f"{path}:3" in str(e.value)


def test_malformed_json_list_names_row(tmp_path):
    path = write(tmp_path / "bad.json", [json.dumps([json.loads(CHAT), {"messages": [msg("tool", "x")]}])])
    with pytest.raises(ValueError, match=r"bad.json row 1: messages\[0\].role"):
        data.load_sft(path, None)    # every row is checked before any is tokenized
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        data.read_rows(write(tmp_path / "x.txt", [CHAT]))


def test_preference_prompts_differ_is_an_error(tmp_path, syn_tok):
    row = {"chosen": [msg(U, "Add 1 and 2."), msg(A, "1 + 2 = 3")], "rejected": [msg(U, "Add 1 and 3."), msg(A, "x")]}
    path = write(tmp_path / "p.jsonl", [json.dumps(row)])
    with pytest.raises(ValueError, match=f"{path}:1: 'chosen' and 'rejected' have different prompts"):
        data.load_pairs(path, syn_tok)
    with pytest.raises(ValueError, match="needs 'chosen' and 'rejected'"):
        data.load_pairs(write(tmp_path / "c.jsonl", [CHAT]), syn_tok)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow") as e:
        data.read_rows(str(tmp_path / "d.parquet"))
    assert "d.parquet" in str(e.value)


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [json.loads(CHAT), json.loads(CHAT)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "d.parquet"))
    assert data.read_rows(str(tmp_path / "d.parquet")) == rows


# ---------------------------------------------------------------------------- inspection command
def test_inspection_command(tmp_path, syn_tok, capsys):
    pref = {"chosen": [msg(U, "Add 1 and 2."), msg(A, "1 + 2 = 3")], "rejected": [msg(U, "Add 1 and 2."), msg(A, "4")]}
    path = write(tmp_path / "d.jsonl", [CHAT, json.dumps(pref)])
    data.main(["--tokenizer", syn_tok.path, "--data", path, "--index", "1", "--json"])
    assert json.loads(capsys.readouterr().out) == dict(zip(("input_ids", "labels"), tokenizer.render_chat(syn_tok, pref["chosen"])))
    data.main(["--tokenizer", syn_tok.path, "--data", path, "--index", "1"])
    out = capsys.readouterr().out
    assert "chosen side" in out and "<|assistant|>\n⟦1 + 2 = 3</s>⟧" in out and "<|user|>\nAdd 1 and 2.</s>" in out
    with pytest.raises(SystemExit) as e:
        data.main(["--tokenizer", syn_tok.path, "--data", path, "--index", "2"])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err
