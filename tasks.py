"""
The two evaluation tasks as data: ARC and GSM8K rows in their published layouts (parse_arc, parse_gsm8k),
ARC's chat question, and how an answer is read out of a generation (the lm-evaluation-harness filters,
eval_gen.py's docstring gives the rules). Used by eval_gen.py (scoring), data.py (such rows as training
conversations) and onpolicy.py (verifier rewards), so all three read answers alike.
"""
import re
import string

LETTERS = "ABCDE"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
ARC_PREFILL = "The best answer is"
ARC_STOPS = ("\n\n", ".")
GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")


class TaskDataError(ValueError):
    """A malformed task file; the message starts with "file:line" (or "file row N")."""


def parse_arc(row, where):
    """AI2 {"question": {"stem", "choices": [{"text", "label"}]}} or HF {"question": str, "choices":
    {"text": [...], "label": [...]}} -> {"id", "stem", "choices": [text], "gold": index}."""
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    q = row.get("question")
    if isinstance(q, dict):                                                # AI2
        stem, ch = q.get("stem"), q.get("choices")
        if not isinstance(ch, list) or not all(isinstance(c, dict) for c in ch):
            raise TaskDataError(f"{where}: question.choices must be a list of {{text, label}}")
        texts, labels = [c.get("text") for c in ch], [c.get("label") for c in ch]
    else:                                                                  # HF
        stem, ch = q, row.get("choices")
        if not (isinstance(ch, dict) and isinstance(ch.get("text"), list) and isinstance(ch.get("label"), list)):
            raise TaskDataError(f"{where}: choices must be {{\"text\": [..], \"label\": [..]}} (HF) or "
                                "question must be {stem, choices} (AI2)")
        texts, labels = ch["text"], ch["label"]
    if not isinstance(stem, str) or not stem.strip():
        raise TaskDataError(f"{where}: missing question text")
    if not 2 <= len(texts) <= 5 or len(labels) != len(texts):
        raise TaskDataError(f"{where}: needs 2-5 choices with a label each, got {len(texts)} and {len(labels)}")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise TaskDataError(f"{where}: every choice needs a non-empty text")
    labels, key = [str(x).strip() for x in labels], str(row.get("answerKey", "")).strip()
    if key not in labels:
        raise TaskDataError(f"{where}: answerKey {row.get('answerKey')!r} is not one of the labels {labels}")
    # A-E or "1"-"5": the gold is a position, lettered A.. like the prompt (numeric labels -> letters)
    return {"id": str(row.get("id", where)), "stem": stem, "choices": texts, "gold": labels.index(key)}


def parse_gsm8k(row, where):
    if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
        raise TaskDataError(f"{where}: expected {{\"question\": str, \"answer\": str}}")
    if "####" not in row["answer"]:
        raise TaskDataError(f"{where}: the answer has no '#### <number>' line")
    return {"id": str(row.get("id", where)), "question": row["question"], "answer": row["answer"],
            "gold": normalize_number(row["answer"])}


def letter_list(n, last):
    return ", ".join(LETTERS[:n - 1]) + f" {last} " + LETTERS[n - 1]


def arc_user_message(q, literal_newlines=False, four_choices=False):
    """literal_newlines: a backslash and an "n" where the harness's single-quoted YAML has them.
    four_choices: the YAML's fixed wording, "four candidate answers (A, B, C and D)", whatever the count; its
    lines A-C always (an absent choice renders empty, as Jinja does), D when there is a 4th, never an E."""
    n, nl = len(q["choices"]), "\\n" if literal_newlines else "\n"
    shown = list(q["choices"])
    if four_choices:
        shown, n = (shown + ["", ""])[:max(3, min(len(shown), 4))], 4
    lines = "".join(f"{LETTERS[i]}. {t}{nl}" for i, t in enumerate(shown))
    return (f"Given the following question and {NUMBER_WORDS[n]} candidate answers ({letter_list(n, 'and')}), "
            f"choose the best answer.{nl}Question: {q['stem'].strip()}{nl}{lines}Your response should end with "
            f"\"The best answer is [the_answer_letter]\" where the [the_answer_letter] is one of {letter_list(n, 'or')}.")


def truncate_at_stops(text, stops):
    for s in stops:
        text = text.split(s)[0]
    return text


def arc_strict(alone, gold):
    """The harness's filter + metric on the new tokens decoded alone (stops applied)."""
    s = alone.strip()
    drop = str.maketrans("", "", string.punctuation)
    return s, s.lower().translate(drop) == gold.lower().translate(drop)


def arc_lenient(generation, n_choices):
    valid = LETTERS[:n_choices]
    m = re.search(r"answer is:?\s*\(?([A-E])\b", ARC_PREFILL + generation)
    if m and m.group(1) in valid:
        return m.group(1)
    m = re.search(rf"\b([{valid}])\b", generation)
    return m.group(1) if m else None


def normalize_number(s):
    """The harness's gsm8k regexes_to_ignore + ignore_case."""
    if s is None:
        return None
    for pat in (",", r"\$", r"(?s).*#### ", r"\.$"):
        s = re.sub(pat, "", s)
    return s.strip().lower()


def gsm8k_extract(text):
    """(strict, flexible): the first "#### N", the last number-like string; None when absent."""
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    return (m.group(1).strip() if m else None), (next(g for g in found[-1] if g).strip() if found else None)
