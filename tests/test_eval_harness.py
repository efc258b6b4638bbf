"""eval_gen.py's two switches toward lm-evaluation-harness 0.4.13's arc_challenge_chat: its fixed
"four candidate answers" wording (--harness_four_choices) and --no_bos dropping only a BOS the tokenizer adds.
The harness's doc_to_text is written out below as its YAML has it (single-quoted: each \\n is a backslash and n)."""
import importlib.util
import json
import os

import eval_gen as E
from test_llama3 import needs_tokenizers, write_tokenizer
from test_train import ROOT

AI2 = os.path.join(ROOT, "tests", "fixtures", "arc_ai2.jsonl")
YAML_DOC_TO_TEXT = (r"Given the following question and four candidate answers (A, B, C and D), choose the best answer."
                    r"\nQuestion: {{question.strip()}}\nA. {{choices.text[0]}}\nB. {{choices.text[1]}}\nC. "
                    r"{{choices.text[2]}}{% if choices.text|length > 3 %}\nD. {{choices.text[3]}}{% endif %}\nYour "
                    r'response should end with "The best answer is [the_answer_letter]" where the '
                    r"[the_answer_letter] is one of A, B, C or D.")
TAIL = r'\nYour response should end with "The best answer is [the_answer_letter]" where the [the_answer_letter] is one of A, B, C or D.'
HEAD = r"Given the following question and four candidate answers (A, B, C and D), choose the best answer.\nQuestion: "
HARNESS = {   # what the harness sends for the fixture's 4-, 3- and 5-choice questions
    4: HEAD + r"Which object is the best conductor of electricity?\nA. a wooden spoon\nB. a rubber band\nC. a copper wire\nD. a paper cup" + TAIL,
    3: HEAD + r"Which state of matter keeps its own shape?\nA. solid\nB. liquid\nC. gas" + TAIL,
    5: HEAD + r"Which unit is used to measure temperature?\nA. meter\nB. kilogram\nC. second\nD. liter" + TAIL,
}


def test_both_switches_give_the_harness_prompt_for_3_4_and_5_choices():
    questions, rows = {}, {}                  # the fixture's first question of each size
    for q, r in zip(E.load_task("arc_gen", AI2), map(json.loads, filter(str.strip, open(AI2)))):
        questions.setdefault(len(q["choices"]), q)
        rows.setdefault(len(q["choices"]), r)
    for n, want in HARNESS.items():
        assert E.arc_user_message(questions[n], literal_newlines=True, four_choices=True) == want, n
        if importlib.util.find_spec("jinja2"):      # the YAML rendered by Jinja, as the harness does
            import jinja2
            r = rows[n]
            doc = {"question": r["question"]["stem"], "choices": {"text": [c["text"] for c in r["question"]["choices"]]}}
            assert jinja2.Template(YAML_DOC_TO_TEXT).render(**doc) == want, n
    # without the switch the count and letters follow the question (ours), and 4 choices are the same text
    assert "five candidate answers (A, B, C, D and E)" in E.arc_user_message(questions[5], literal_newlines=True)
    assert E.arc_user_message(questions[4], True) == E.arc_user_message(questions[4], True, four_choices=True)


@needs_tokenizers
def test_no_bos_drops_only_a_bos_the_tokenizer_adds(tmp_path):
    import tokenizer
    q = E.load_task("arc_gen", AI2)[0]
    chatml = tokenizer.load_tokenizer(write_tokenizer(str(tmp_path / "chatml"), "chatml"))   # BOS = <|im_start|>
    assert not chatml.add_bos
    with_bos, without = E.arc_gen_prompt(chatml, q), E.arc_gen_prompt(chatml, q, bos=False)
    assert without == with_bos and with_bos[0] == chatml.bos_id        # the template's own text stays
    assert E.arc_prompt_text(q, chatml).startswith("<|im_start|>system\n")
    llama3 = tokenizer.load_tokenizer(write_tokenizer(str(tmp_path / "llama3"), "llama3"))    # adds <|begin_of_text|>
    assert llama3.add_bos and E.arc_gen_prompt(llama3, q, bos=False) == E.arc_gen_prompt(llama3, q)[1:]
