"""eval_gen.py: harness prompt and scoring rules, log-likelihood scoring, batching, sharding, CLI.
All questions are hand-written fixtures in the ARC / GSM8K formats (tests/fixtures), never real data."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eval_gen as E
import tokenizer
from conftest import teardown_abort_only
from generate import generate
from infra import hf_io
from model import ModelArgs, Transformer

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
AI2, HF, TRAIN = (os.path.join(FIX, f) for f in ("arc_ai2.jsonl", "arc_hf.jsonl", "arc_train.jsonl"))
GSM, GSM_TRAIN = os.path.join(FIX, "gsm8k_test.jsonl"), os.path.join(FIX, "gsm8k_train.jsonl")


def _corpus():
    """Text for a tiny tokenizer: everything the tests render, so pieces exist for all of it."""
    lines = []
    for path in (AI2, HF, TRAIN):
        for q in E.load_task("arc_gen", path):
            lines += [E.arc_user_message(q), E.arc_ll_context(q, []), " ".join(q["choices"])]
    for path in (GSM, GSM_TRAIN):
        for q in E.load_task("gsm8k", path):
            lines += [q["question"], q["answer"]]
    lines += ["<|user|>\n<|assistant|>\nThe best answer is A. The best answer is B because C D E",
              "yes no maybe cat dog owl red tan blue none of these I am not sure", "0123456789 $ , . #### ?"]
    return lines * 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small are all overhead: on a shared 2-core box, 2 threads ran 40x slower than 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer.train_tokenizer(_corpus(), str(tmp_path_factory.mktemp("tok") / "tiny"), 400)


def tiny_model(tok, seed=0, std=0.3, dtype=torch.float32):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=40,
                     vocab_size=tok.vocab_size, max_position_embeddings=4096)
    return Transformer(args).init_weights(std=std, seed=seed).to(dtype).eval()


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    hf_io.save_model(tiny_model(tok), path, extra_files={"tokenizer.model": tok.path})
    return path


class StubModel:
    """Continues every prompt with the tokens of a chosen string (per prompt, or one for all),
    honouring generate's contract: stop at (and include) the first stop id, at most max_new_tokens.
    eval_gen generates through generate(generate, model, ...): the fixture below routes a stub to itself."""

    def __init__(self, tok, replies, context=E.ARC_PREFILL):
        self.args = ModelArgs(vocab_size=tok.vocab_size)
        self.tok, self.replies, self.context, self.calls = tok, replies, context, []

    def reply(self, prompts, max_new_tokens, *, stop_ids=None, **kw):
        self.calls.append((len(prompts), list(stop_ids)))
        out = []
        for p in prompts:
            text = self.replies if isinstance(self.replies, str) else self.replies[tuple(p)]
            ids = E.encode_pair(self.tok, self.context, text, bos=False)[1]   # text as a continuation
            end = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
            out.append(ids[:min(end, max_new_tokens)])
        return out


@pytest.fixture(autouse=True)
def stubs_answer_themselves(monkeypatch):
    real = E.generate
    monkeypatch.setattr(E, "generate", lambda model, *a, **kw: model.reply(*a, **kw) if isinstance(model, StubModel)
                        else real(model, *a, **kw))


# ------------------------------------------------------------------------------------ data files
def test_fixtures_parse_both_shapes_numeric_labels_and_choice_counts():
    ai2, hf = E.load_task("arc_gen", AI2), E.load_task("arc_gen", HF)
    assert [len(q["choices"]) for q in ai2] == [4, 4, 3, 5, 3]
    assert [len(q["choices"]) for q in hf] == [4, 4, 5, 3]
    # numeric labels "1".."4" -> letters by position; "2" is the second choice (B), "3" the third (C)
    assert [E.LETTERS[q["gold"]] for q in ai2] == ["C", "B", "A", "E", "C"]
    assert [E.LETTERS[q["gold"]] for q in hf] == ["B", "B", "E", "A"]
    assert ai2[1]["choices"][ai2[1]["gold"]] == "carbon dioxide"
    assert hf[0]["stem"] == "Which part of a plant takes in water from the soil?"
    assert [q["idx"] for q in ai2] == [0, 1, 2, 3, 4]
    assert len(E.load_task("arc_gen", AI2, limit=2)) == 2
    g = E.load_task("gsm8k", GSM)
    assert [q["gold"] for q in g] == ["12", "10", "750"]


@pytest.mark.parametrize("body, where, needle", [
    ('{"id": 1}\n\n{"question": oops}\n', ":3:", "invalid JSON"),
    ('{"question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "A"}\n'
     '{"question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "C"}\n',
     ":2:", "answerKey 'C' is not one of the labels"),
    ('{"question": "Q?", "choices": {"text": ["only"], "label": ["A"]}, "answerKey": "A"}\n', ":1:", "2-5 choices"),
    ('{"question": "Q?", "choices": ["a", "b"], "answerKey": "A"}\n', ":1:", "choices must be"),
    ('{"question": {"stem": "Q?", "choices": "a b"}, "answerKey": "A"}\n', ":1:", "question.choices must be"),
    ('{"question": "", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}\n', ":1:", "missing question"),
    ('{"question": "Q?", "choices": {"text": ["a", ""], "label": ["A", "B"]}, "answerKey": "A"}\n', ":1:", "non-empty"),
    ('[1, 2]\n', ":1:", "expected a JSON object"),
])
def test_malformed_arc_files_name_file_and_line(tmp_path, body, where, needle):
    path = tmp_path / "arc_bad.jsonl"
    path.write_text(body)
    with pytest.raises(E.TaskDataError) as e:
        E.load_task("arc_gen", str(path))
    assert str(e.value).startswith(str(path) + where) and needle in str(e.value), str(e.value)


def test_malformed_gsm8k_json_and_parquet_errors(tmp_path):
    p = tmp_path / "gsm8k_bad.jsonl"
    p.write_text('{"question": "a?", "answer": "b\\n#### 1"}\n{"question": "c?", "answer": "no final line"}\n')
    with pytest.raises(E.TaskDataError, match=rf"^{p}:2: .*####"):
        E.load_task("gsm8k", str(p))
    j = tmp_path / "arc.json"                          # a JSON list names the item
    j.write_text('[{"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "Z"}]')
    with pytest.raises(E.TaskDataError, match=rf"^{j} row 0: answerKey"):
        E.load_task("arc_gen", str(j))
    with pytest.raises(E.TaskDataError, match="no such file"):
        E.load_task("arc_gen", str(tmp_path / "missing.jsonl"))
    pq = tmp_path / "arc.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        pq.write_bytes(b"PAR1")
        with pytest.raises(E.TaskDataError, match="pip install pyarrow"):
            E.load_task("arc_gen", str(pq))
    else:                                              # with pyarrow: HF's parquet rows load
        import pyarrow as pa
        import pyarrow.parquet as papq
        rows = [json.loads(line) for line in open(HF)]
        papq.write_table(pa.Table.from_pylist(rows), str(pq))
        assert [q["gold"] for q in E.load_task("arc_gen", str(pq))] == [1, 1, 4, 0]


# --------------------------------------------------------------------------------------- prompts
HARNESS_4 = ('Given the following question and four candidate answers (A, B, C and D), choose the best answer.\n'
             'Question: Which object is the best conductor of electricity?\n'
             'A. a wooden spoon\nB. a rubber band\nC. a copper wire\nD. a paper cup\n'
             'Your response should end with "The best answer is [the_answer_letter]" where the '
             '[the_answer_letter] is one of A, B, C or D.')


def test_user_message_is_the_harness_text_and_adapts_to_3_and_5_choices():
    q = E.load_task("arc_gen", AI2)
    assert E.arc_user_message(q[0]) == HARNESS_4
    assert E.arc_user_message(q[2]) == (
        'Given the following question and three candidate answers (A, B and C), choose the best answer.\n'
        'Question: Which state of matter keeps its own shape?\nA. solid\nB. liquid\nC. gas\n'
        'Your response should end with "The best answer is [the_answer_letter]" where the '
        '[the_answer_letter] is one of A, B or C.')
    assert E.arc_user_message(q[3]) == (
        'Given the following question and five candidate answers (A, B, C, D and E), choose the best answer.\n'
        'Question: Which unit is used to measure temperature?\nA. meter\nB. kilogram\nC. second\nD. liter\n'
        'E. degree Celsius\nYour response should end with "The best answer is [the_answer_letter]" where the '
        '[the_answer_letter] is one of A, B, C, D or E.')
    assert "Question: A ball rolls down a ramp. What force pulls it down?\nA. magnetism" in E.arc_user_message(q[4])
    assert E.arc_prompt_text(q[0]) == f"<|user|>\n{HARNESS_4}</s>\n<|assistant|>\nThe best answer is"


MISTRAL_IDS = [  # Mistral-7B v0.1 tokenizer; BOS, "<|user|>\n...D." piece, EOS, "\n<|assistant|>\nThe best answer is"
    1, 523, 28766, 1838, 28766, 28767, 13, 28777, 5067, 272, 2296, 2996, 304, 2308, 10169, 11194, 325, 28741,
    28725, 365, 28725, 334, 304, 384, 557, 4987, 272, 1489, 4372, 28723, 13, 24994, 28747, 9595, 1928, 349,
    272, 1489, 8667, 1810, 302, 17242, 28804, 13, 28741, 28723, 264, 12602, 28662, 13, 28760, 28723, 264,
    20452, 4028, 13, 28743, 28723, 264, 21569, 9112, 13, 28757, 28723, 264, 3830, 6211, 13, 11159, 2899, 1023,
    948, 395, 345, 1014, 1489, 4372, 349, 733, 1237, 28730, 24115, 28730, 15867, 28793, 28739, 970, 272, 733,
    1237, 28730, 24115, 28730, 15867, 28793, 349, 624, 302, 330, 28725, 365, 28725, 334, 442, 384, 28723,
    2, 28705, 13, 28789, 28766, 489, 11143, 28766, 28767, 13, 1014, 1489, 4372, 349]


def mistral_tokenizer():
    spec = importlib.util.find_spec("mistral_common")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    if not path or not os.path.isfile(path):
        pytest.skip("needs mistral-common's tokenizer.model.v1 (pip install --no-deps mistral-common)")
    return tokenizer.Tokenizer(path)


def test_prompt_ids_literal_with_the_mistral_tokenizer():
    tok = mistral_tokenizer()
    q = E.load_task("arc_gen", AI2)[0]
    ids = E.arc_gen_prompt(tok, q)
    assert ids == MISTRAL_IDS
    # the pre-fill is part of the piece after EOS: "\n" then "The" (1014) without "▁" (not 415 "▁The")
    assert tok.decode(ids[-4:]) == "The best answer is" and 415 not in ids[-4:]
    # non-legacy drops only the lone "▁" (28705) after EOS; --no_bos drops only BOS
    assert E.arc_gen_prompt(tok, q, legacy=False) == MISTRAL_IDS[:-13] + MISTRAL_IDS[-12:]
    assert E.arc_gen_prompt(tok, q, bos=False) == MISTRAL_IDS[1:]


def test_prefill_is_one_piece_with_the_generation_prompt(tok):
    q = E.load_task("arc_gen", HF)[2]
    ids, _ = tokenizer.render_chat(tok, [{"role": "user", "content": E.arc_user_message(q)}], add_generation_prompt=True)
    head = tok.encode("\n<|assistant|>\n")
    full = E.arc_gen_prompt(tok, q)
    assert full[:len(ids) - len(head)] == ids[:-len(head)]
    assert full[len(ids) - len(head):] == tok.encode("\n<|assistant|>\nThe best answer is")


def test_fewshot_contexts_and_draws():
    pool = E.load_task("arc_ll", TRAIN)
    q = E.load_task("arc_ll", AI2)[0]
    assert E.arc_ll_context(q, pool[:2]) == (
        "Question: What does a magnet attract?\nAnswer: iron nails\n\n"
        "Question: Which of these is a source of light?\nAnswer: the Sun\n\n"
        "Question: Which object is the best conductor of electricity?\nAnswer:")
    g, gpool = E.load_task("gsm8k", GSM)[0], E.load_task("gsm8k", GSM_TRAIN)
    assert E.gsm8k_context(g, gpool[:1]) == (
        "Question: Ann reads 6 pages a day for 7 days. How many pages does she read?\n"
        "Answer: She reads 6 * 7 = <<6*7=42>>42 pages.\n#### 42\n\n"
        "Question: Tom has 3 boxes with 4 apples in each box. How many apples does Tom have?\nAnswer:")
    a = E.fewshot(pool, 3, 1234, q, "stem")
    assert a == E.fewshot(pool, 3, 1234, dict(q), "stem") and len({s["id"] for s in a}) == 3
    draws = {tuple(s["id"] for s in E.fewshot(pool, 3, 1234, dict(q, idx=i), "stem")) for i in range(8)}
    assert len(draws) > 1                                  # questions get different shots
    assert all(s["stem"] != pool[0]["stem"] for s in E.fewshot(pool, 5, 0, dict(pool[0], idx=7), "stem"))
    with pytest.raises(E.TaskDataError, match="7-shot"):
        E.fewshot(pool, 7, 0, q, "stem")


def test_encode_pair_follows_the_harness(tok):
    ctx, cont = "Question: Which tool measures mass?\nAnswer:", " a balance"
    a, b = E.encode_pair(tok, ctx, cont)
    whole = [tok.bos_id] + tok.encode(ctx + cont)
    assert a + b == whole and a == [tok.bos_id] + tok.encode(ctx) and tok.decode(b) == "a balance"
    # trailing spaces of the context move to the continuation
    assert E.encode_pair(tok, ctx + " ", "a balance") == (a, b)


# --------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("cont, strict, letter", [
    (" C.", True, "C"),              # cut at ".", one space stripped -> "C"
    (" C because copper", False, "C"),
    (" (C)", True, "C"),             # punctuation ignored
    (" c", True, None),              # case ignored (strict); the lenient letter must be a capital
    ("\nC", True, "C"),              # the harness's filter strips all leading/trailing whitespace
    ("  C", True, "C"),
    ("C\n", True, "C"),
    (" none of these", False, None),
    (" E", False, None),             # E is not a choice of this 4-choice question
    (" A. Then C.", False, "A"),
])
def test_scoring_rules_with_a_stub_model(tok, cont, strict, letter):
    q = E.load_task("arc_gen", AI2)[:1]                # gold C
    stub = StubModel(tok, cont)
    (r,) = E.run_arc_gen(stub, tok, q, batch_size=1)
    assert (r["correct"], r["extracted"], r["invalid"]) == (strict, letter, letter is None)
    assert r["lenient_correct"] == (letter == "C") and r["gold"] == "C"
    assert r["generation"] == E.truncate_at_stops(cont, E.ARC_STOPS)
    assert tok.eos_id in stub.calls[0][1] and stub.calls[0][0] == 1


def test_stub_scores_and_summary_count_choices(tok):
    qs = E.load_task("arc_gen", AI2)                   # gold C B A E C; 4 4 3 5 3 choices
    replies = [" C.", " C because", " I am not sure", " E.", " B, no C"]
    stub = StubModel(tok, {tuple(E.arc_gen_prompt(tok, q)): r for q, r in zip(qs, replies)})
    recs = E.run_arc_gen(stub, tok, qs, batch_size=4)
    assert [r["correct"] for r in recs] == [True, False, False, True, False]
    assert [r["extracted"] for r in recs] == ["C", "C", None, "E", "B"]
    assert [r["response"] for r in recs] == ["C", "C because", "I am not sure", "E", "B, no C"]
    s = E.summarize("arc_gen", recs, elapsed=2.0)
    assert s["accuracy"] == pytest.approx(0.4) and s["stderr"] == pytest.approx(math.sqrt(0.4 * 0.6 / 4))
    assert s["lenient"] == pytest.approx(0.4) and s["invalid_rate"] == pytest.approx(0.2)
    assert s["by_n_choices"] == {"3": {"n": 2, "accuracy": 0.0}, "4": {"n": 2, "accuracy": 0.5},
                                 "5": {"n": 1, "accuracy": 1.0}}
    assert s["questions_per_second"] == pytest.approx(2.5) and s["n"] == 5


def test_gsm8k_extraction_and_stub(tok):
    assert E.gsm8k_extract("so 1,200 - 450 = 750.\n#### 750") == ("750", "750")
    assert E.gsm8k_extract("He pays $18.") == (None, "$18.")
    assert E.normalize_number("$1,200.") == "1200" and E.normalize_number(None) is None
    assert E.gsm8k_extract("no digits") == (None, None)
    q = E.load_task("gsm8k", GSM)
    replies = [" 3 * 4 = 12 apples.\n#### 12\n\nQuestion: what next? #### 99",   # cut at "Question:"
               " The change is $10.",                                            # flexible only
               " 1,200 - 450 = 750 chickens, or 751.\n#### 700"]                  # strict wins, wrong
    ctxs = [E.gsm8k_context(x, []) for x in q]
    prompts = [tuple([tok.bos_id] + tok.encode(c)) for c in ctxs]
    stub = StubModel(tok, dict(zip(prompts, replies)), context="Answer:")
    recs = E.run_gsm8k(stub, tok, q, num_fewshot=0, batch_size=2)
    assert [r["extracted"] for r in recs] == ["12", "10", "700"]
    assert [r["correct"] for r in recs] == [True, True, False]
    assert [r["strict_correct"] for r in recs] == [True, False, False]
    assert [r["flexible_correct"] for r in recs] == [True, True, False]
    assert recs[0]["generation"] == " 3 * 4 = 12 apples.\n#### 12\n\n"


def test_stderr_is_the_sample_standard_error():
    assert E.stderr([1, 0, 1, 1]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert E.stderr([1]) is None


# --------------------------------------------------------------------------------- log-likelihood
def unigram_model(tok, bias):
    """A real Transformer whose next-token logits are `bias` whatever the context: layers output 0,
    every embedding is all-ones (the final RMSNorm, its weight undoing eps, keeps it), lm_head row
    v = bias[v] / dim."""
    m = tiny_model(tok)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        m.embed_tokens.weight.fill_(1.0)
        m.norm.weight.fill_(math.sqrt(1 + m.args.norm_eps))
        m.lm_head.weight.copy_(bias[:, None].expand_as(m.lm_head.weight) / m.args.dim)
    return m


def test_loglikelihood_picks_the_preferred_choice_and_acc_norm_differs(tok):
    q1 = {"idx": 0, "id": "u1", "stem": "Say something.", "choices": ["no", "yes yes yes yes yes yes"], "gold": 1}
    q2 = {"idx": 1, "id": "u2", "stem": "Which pet?", "choices": ["cat", "dog", "owl"], "gold": 1}
    conts = {c: E.encode_pair(tok, E.arc_ll_context(q, []), " " + c)[1] for q in (q1, q2) for c in q["choices"]}
    bias = torch.zeros(tok.vocab_size)
    for c, boost in (("no", 4.0), ("yes yes yes yes yes yes", 6.0), ("dog", 5.0)):
        bias[conts[c]] = boost
    lp = torch.log_softmax(bias.double(), -1)
    want = {c: float(lp[ids].sum()) for c, ids in conts.items()}   # independent of the model code
    recs = E.run_arc_ll(unigram_model(tok, bias), tok, [q1, q2], num_fewshot=0, batch_size=3)
    for r, q in zip(recs, (q1, q2)):
        assert r["loglik"] == pytest.approx([want[c] for c in q["choices"]], abs=1e-4)
    # q1: the short choice has the larger total, the long one the larger per-character score
    assert want["no"] > want["yes yes yes yes yes yes"]
    assert want["no"] / 2 < want["yes yes yes yes yes yes"] / 23
    assert (recs[0]["extracted"], recs[0]["extracted_norm"]) == ("A", "B")
    assert (recs[0]["correct"], recs[0]["correct_norm"]) == (False, True)
    assert (recs[1]["extracted"], recs[1]["extracted_norm"], recs[1]["correct"]) == ("B", "B", True)
    s = E.summarize("arc_ll", recs, 1.0)
    assert (s["accuracy"], s["acc_norm"]) == (0.5, 1.0)


def test_batched_loglikelihoods_equal_full_forward(tok):
    m = tiny_model(tok, seed=3)
    qs, pool = E.load_task("arc_ll", AI2), E.load_task("arc_ll", TRAIN)
    recs = E.run_arc_ll(m, tok, qs, pool=pool, num_fewshot=2, seed=5, batch_size=5)
    for q, r in zip(qs, recs):                 # one unpadded sequence at a time, all logits, by hand
        ctx = E.arc_ll_context(q, E.fewshot(pool, 2, 5, q, "stem"))
        assert r["prompt"] == ctx
        for c, got in zip(q["choices"], r["loglik"]):
            a = [tok.bos_id] + tok.encode(ctx)
            whole = [tok.bos_id] + tok.encode(ctx + " " + c)
            with torch.no_grad():
                lp = torch.log_softmax(m(torch.tensor([whole]))[0].double(), -1)
            ref = sum(float(lp[t - 1, whole[t]]) for t in range(len(a), len(whole)))
            assert got == pytest.approx(ref, abs=1e-4)


# ---------------------------------------------------------------------------- batching and ranks
def _fields(recs, drop=("new_tokens",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def test_batched_generation_equals_one_by_one(tok):
    m = tiny_model(tok, seed=1, std=0.5, dtype=torch.float64)   # float64: no near-tie flips
    stops = E.stop_token_ids(tok, E.ARC_STOPS)
    assert tok.eos_id in stops and tok.encode(".")[-1] in stops
    with torch.no_grad():                                          # make "." likely, not certain
        m.lm_head.weight[stops[1:]] *= 2.0
    qs = E.load_task("arc_gen", AI2) + E.load_task("arc_gen", HF)
    for i, q in enumerate(qs):
        q["idx"] = i
    assert len({len(E.arc_gen_prompt(tok, q)) for q in qs}) > 3   # really mixed lengths
    batched = E.run_arc_gen(m, tok, qs, batch_size=4, max_new_tokens=16)
    single = E.run_arc_gen(m, tok, qs, batch_size=1, max_new_tokens=16, early_stop=False)
    assert _fields(batched) == _fields(single)
    # rows stopped at a "." token at different steps, others ran to the limit; without early stop
    # every row ran 16 steps, and the texts still agree (cut at "." afterwards)
    n_b = [r["new_tokens"] for r in batched]
    assert min(n_b) < 16 and max(n_b) == 16 and {r["new_tokens"] for r in single} == {16}
    assert len({r["generation"] for r in single}) > 1              # the model says different things
    for q, r in zip(qs[:3], single):                               # and batch 1 is plain generate
        g = generate(m, [E.arc_gen_prompt(tok, q)], 16, stop_ids=[tok.eos_id])[0]
        assert r["generation"] == E.truncate_at_stops(E.decode_gen(tok, g)[0], E.ARC_STOPS)
    g_b = E.run_gsm8k(m, tok, E.load_task("gsm8k", GSM), num_fewshot=0, batch_size=3, max_new_tokens=10)
    g_1 = E.run_gsm8k(m, tok, E.load_task("gsm8k", GSM), num_fewshot=0, batch_size=1, max_new_tokens=10)
    assert _fields(g_b) == _fields(g_1)


def test_shards_merge_to_the_single_process_result(tok):
    m = tiny_model(tok, seed=2)
    qs, pool = E.load_task("arc_ll", AI2), E.load_task("arc_ll", TRAIN)
    whole = E.run_arc_ll(m, tok, qs, pool=pool, num_fewshot=2, batch_size=4)
    for world in (2, 3):
        parts = [E.run_arc_ll(m, tok, E.shard(qs, r, world), pool=pool, num_fewshot=2, batch_size=4)
                 for r in range(world)]
        merged = E.merge(parts)
        assert [r["idx"] for r in merged] == list(range(len(qs)))
        for a, b in zip(merged, whole):
            assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5) and _fields([a], ("loglik",)) == _fields([b], ("loglik",))


# ------------------------------------------------------------------------------------------- CLI
def test_cli_writes_results_summary_and_one_line(ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    E.main(["--model", ckpt, "--task", "arc_gen", "--data", AI2, "--out", out, "--batch_size", "2",
            "--max_new_tokens", "6"])
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("arc_gen: accuracy=") and "questions/s" in line[0]
    recs = [json.loads(x) for x in open(os.path.join(out, "arc_gen.jsonl"))]
    s = json.load(open(os.path.join(out, "arc_gen_summary.json")))
    assert [r["id"] for r in recs] == [f"FIX-AI2-{i}" for i in range(1, 6)]
    assert {"prompt", "generation", "extracted", "gold", "correct"} <= set(recs[0])
    assert s["n"] == 5 and s["by_n_choices"]["5"]["n"] == 1 and s["questions_per_second"] > 0
    assert s["accuracy"] == sum(r["correct"] for r in recs) / 5 and s["batch_size"] == 2
    assert not [f for f in os.listdir(out) if f.startswith(".")]          # no temp files left
    E.main(["--model", ckpt, "--task", "arc_ll", "--data", HF, "--fewshot_data", TRAIN, "--num_fewshot", "2",
            "--out", out, "--limit", "3"])
    s = json.load(open(os.path.join(out, "arc_ll_summary.json")))
    assert s["n"] == 3 and "acc_norm" in s and s["num_fewshot"] == 2
    E.main(["--model", ckpt, "--task", "gsm8k", "--data", GSM, "--fewshot_data", GSM_TRAIN, "--num_fewshot", "1",
            "--out", out, "--max_new_tokens", "5"])
    assert json.load(open(os.path.join(out, "gsm8k_summary.json")))["n"] == 3
    with pytest.raises(SystemExit):
        E.main(["--model", ckpt, "--task", "gsm8k", "--data", GSM])       # 5-shot without a pool
    bad = tmp_path / "arc_bad.jsonl"
    bad.write_text('{"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}\n{\n')
    with pytest.raises(SystemExit, match=rf"{bad}:2: invalid JSON"):
        E.main(["--model", ckpt, "--task", "arc_gen", "--data", str(bad)])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_torchrun_two_ranks_match_one_process(ckpt, tmp_path):
    args = ["--model", ckpt, "--task", "arc_gen", "--data", HF, "--max_new_tokens", "6", "--batch_size", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    E.main(args + ["--out", one])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")])))
    # --standalone picks a free port itself (--master_port=0 leaves the workers waiting forever)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(os.path.dirname(HERE), "eval_gen.py")] + args + ["--out", two],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 or teardown_abort_only(r, "arc_gen: accuracy="), r.stderr[-2000:]
    a = [json.loads(x) for x in open(os.path.join(one, "arc_gen.jsonl"))]
    b = [json.loads(x) for x in open(os.path.join(two, "arc_gen.jsonl"))]
    assert _fields(a) == _fields(b) and len(a) == 4
    assert json.load(open(os.path.join(two, "arc_gen_summary.json")))["world_size"] == 2
    assert r.stdout.count("arc_gen: accuracy=") == 1                  # rank 0 alone reports


# ------------------------------------------------------------------- harness parity, stop strings
def test_harness_literal_newlines_is_the_yaml_prompt_byte_for_byte(tok, ckpt, tmp_path):
    """arc_challenge_chat.yaml's doc_to_text is single-quoted: its six "\\n" reach the model as a
    backslash and an "n". Hand-written from the YAML for the 4-choice fixture question."""
    q = E.load_task("arc_gen", AI2)[0]
    literal = ('Given the following question and four candidate answers (A, B, C and D), choose the best answer.\\n'
               'Question: Which object is the best conductor of electricity?\\n'
               'A. a wooden spoon\\nB. a rubber band\\nC. a copper wire\\nD. a paper cup\\n'
               'Your response should end with "The best answer is [the_answer_letter]" where the '
               '[the_answer_letter] is one of A, B, C or D.')
    assert literal.count("\\n") == 6 and "\n" not in literal
    assert E.arc_user_message(q, literal_newlines=True) == literal
    assert E.arc_user_message(q) == HARNESS_4                     # default: real newlines
    ids = E.arc_gen_prompt(tok, q, literal_newlines=True)
    assert tok.decode(ids).count("\\n") == 6 and ids != E.arc_gen_prompt(tok, q)
    out = str(tmp_path / "out")
    E.main(["--model", ckpt, "--task", "arc_gen", "--data", AI2, "--limit", "1", "--max_new_tokens", "2",
            "--out", out, "--harness_literal_newlines"])
    (r,) = [json.loads(x) for x in open(os.path.join(out, "arc_gen.jsonl"))]
    assert literal in r["prompt"]
    assert json.load(open(os.path.join(out, "arc_gen_summary.json")))["harness_literal_newlines"] is True


class IdsStub(StubModel):
    """Continues every prompt with fixed token ids (special tokens included)."""

    def reply(self, prompts, max_new_tokens, *, stop_ids=None, **kw):
        self.calls.append((len(prompts), list(stop_ids)))
        return [list(self.replies) for _ in prompts]


def test_gsm8k_decodes_with_special_tokens_skipped(tok):
    q = E.load_task("gsm8k", GSM)[:1]                             # gold 12
    ids = tok.encode("so #### 1") + [tok.bos_id] + tok.encode("2", dummy_prefix=False)
    (r,) = E.run_gsm8k(IdsStub(tok, ids), tok, q, num_fewshot=0)
    assert r["generation"] == " so #### 12" and r["extracted"] == "12" and r["correct"]
    assert E.decode_gen(tok, [tok.unk_id] + tok.encode("A"))[0] == " A"


def test_default_dtype_is_bf16_on_cuda_fp32_on_cpu():
    base = ["--model", "m", "--task", "arc_gen", "--data", "d"]
    assert E.parse_args(base + ["--device", "cuda"]).dtype == "bfloat16"
    assert E.parse_args(base + ["--device", "cpu"]).dtype == "float32"
    assert E.parse_args(base + ["--device", "cuda", "--dtype", "float32"]).dtype == "float32"


def test_compiled_generation_fills_up_the_last_batch(tok):
    qs = E.load_task("arc_gen", AI2)                              # 5 questions, batch 2: 2 + 2 + 1
    stub = StubModel(tok, " C.")
    recs = E.run_arc_gen(stub, tok, qs, batch_size=2, compile=True)
    assert [c[0] for c in stub.calls] == [2, 2, 2] and len(recs) == 5
    assert all(r["response"] == "C" for r in recs)


def _tokens_to_first_stop(tok, gen, stops):
    return next((n for n in range(1, len(gen) + 1) if any(s in E.decode_gen(tok, gen[:n])[0] for s in stops)), len(gen))


def test_stop_strings_end_rows_early_and_change_no_result(tok):
    """"\\n\\n" is two byte tokens here and "Question:" several: no single stop id can end a row on
    them; the stop-string check does, exactly where the text first holds one."""
    m = tiny_model(tok, seed=3, std=0.5, dtype=torch.float64)
    nl = tok.encode("\n", dummy_prefix=False)
    assert len(nl) == 1 and tok.encode("\n\n", dummy_prefix=False) == nl * 2
    with torch.no_grad():
        m.lm_head.weight[nl[0]] *= 3.0                            # newlines likely, not certain
    qs = E.load_task("arc_gen", AI2) + E.load_task("arc_gen", HF)
    for i, q in enumerate(qs):
        q["idx"] = i
    early = E.run_arc_gen(m, tok, qs, batch_size=4, max_new_tokens=24)
    full = E.run_arc_gen(m, tok, qs, batch_size=4, max_new_tokens=24, early_stop=False)
    assert _fields(early) == _fields(full)
    prompts = [E.arc_gen_prompt(tok, q) for q in qs]
    gens = [generate(m, [p], 24, stop_ids=[tok.eos_id])[0] for p in prompts]
    want = [_tokens_to_first_stop(tok, g, E.ARC_STOPS) for g in gens]
    assert [r["new_tokens"] for r in early] == want
    assert any("\n\n" in E.decode_gen(tok, g[:n])[0] and "." not in E.decode_gen(tok, g[:n])[0]
               for g, n in zip(gens, want))                       # a row ended by the two-token stop
    gq = E.load_task("gsm8k", GSM)
    g_early = E.run_gsm8k(m, tok, gq, num_fewshot=0, batch_size=3, max_new_tokens=12)
    g_full = E.run_gsm8k(m, tok, gq, num_fewshot=0, batch_size=3, max_new_tokens=12, early_stop=False)
    assert _fields(g_early) == _fields(g_full)
