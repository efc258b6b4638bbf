"""
Data for nanoIFT: tokenizers (sentencepiece, or a Hugging Face tokenizer.json with the checkpoint's
own Jinja chat template), chat rendered straight to ids and labels (METHOD §5), readers for the formats
users bring (METHOD §6), SFT/IFT and pairwise examples with truncation, padding, a deterministic
length-grouped sharded batch plan, and a synthetic task (plus tokenizer training) for the demo and the
tests. Show what the model will be trained on:
    python data.py --tokenizer CHECKPOINT_DIR_OR_TOKENIZER_FILE --data FILE [--index N] [--json]

Token rule (HF's "legacy" Llama/Mistral tokenizer): split the rendered text at every "</s>", encode
each piece with sentencepiece (each gets the dummy-prefix "▁"), join with the EOS id, prepend BOS.
So a literal "</s>" inside a message becomes the EOS id, as the HF tokenizer of those models makes it
(inside an assistant turn it is supervised like the rest of the answer; load_* count such rows).
Pieces are encoded by sentencepiece itself: HF's *fast* tokenizer differs on runs of spaces.

tokenizer.json (Llama-3, SmolLM2, ...; HFTokenizer): the conversation is rendered to text by the
checkpoint's own template exactly as transformers' apply_chat_template does, and that text is encoded
once (special-token texts become their ids). The supervised tokens are found from character spans
(where each assistant content sits in the rendered text) and the tokenizer's offsets; see render_chat.
"""
import argparse
import datetime
import functools
import glob
import io
import json
import os
import random
import re
import sys

import numpy as np
import torch

IGNORE = -100
ROLES = ("system", "user", "assistant")
EOS_TEXT = "</s>"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Bad input data or a bad --data value, a user error: the message starts with the file and
    line ("file:3") or row ("file row 3") and names the field. The command lines print it as one line."""


class MissingDependency(DataError, ImportError):
    """An optional package the input needs (pyarrow for .parquet): a user error, and an ImportError."""


# The tokenizer interface (two implementations, duck-typed): path, vocab_size, bos_id, eos_id (the
# token that closes an assistant turn: what training supervises and generation stops on), pad_id,
# add_bos (prepend BOS to plain text, as the tokenizer itself does), chat_template (None: the Zephyr
# rules of render_chat), encode(text), decode(ids), text_of(ids), files() ({name: path} to copy into a
# checkpoint). load_tokenizer picks the implementation.
class Tokenizer:
    """A sentencepiece model (Mistral v0.1: vocab 32000, unk 0, bos 1, eos 2, no pad)."""
    chat_template = None   # Zephyr, rendered by render_chat's sentencepiece rules
    add_bos = True

    def __init__(self, path):
        import sentencepiece as spm
        self.path = os.fspath(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        # No pad in Mistral's model: pad with unk, never EOS, so padding can't pass for an answer's
        # EOS. Labels on padding are -100 and masks come from lengths regardless.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        self._nl_barrier = None

    def encode(self, text, dummy_prefix=True):
        """Ids, no BOS/EOS. dummy_prefix=False (HF non-legacy, after a special token): sentencepiece
        can't switch the prefix off per call, so encode "\\n" + text and strip the ids of "\\n". Exact
        when no piece contains "\\n" (Mistral's and ours: a byte token), as BPE never merges across it."""
        if dummy_prefix:
            return self.sp.encode(text)
        if self._nl_barrier is None:
            self._nl_barrier = not any("\n" in self.sp.id_to_piece(i) for i in range(self.vocab_size))
        head, ids = self.sp.encode("\n"), self.sp.encode("\n" + text)
        if not self._nl_barrier or ids[:len(head)] != head:
            raise ValueError(f"{self.path}: has pieces containing a newline; non-legacy encoding unsupported")
        return ids[len(head):]

    def decode(self, ids):   # ids past the vocabulary (a model's padded embedding) have no text
        return self.sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])

    def text_of(self, ids):
        """The exact text of ids token by token (leading spaces kept, <s> and </s> spelled out)."""
        buf = bytearray()
        for i in map(int, ids):
            p = self.sp.id_to_piece(i)
            buf += bytes([int(p[3:5], 16)]) if self.sp.is_byte(i) else p.replace("▁", " ").encode()
        return buf.decode("utf-8", errors="replace")

    def files(self):
        return {"tokenizer.model": self.path}


def _read_json(path):
    """The parsed file, or None if it does not exist; bad JSON is an error naming the file."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _token_text(v):   # tokenizer_config.json spells a special token as "<s>" or {"content": "<s>", ...}
    return v.get("content") if isinstance(v, dict) else v


def _chat_template(d):
    """(template source, name for messages) of a tokenizer directory, or (None, None). Looked up where
    transformers looks: chat_template.jinja, chat_template.json, tokenizer_config.json's chat_template."""
    path = os.path.join(d, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(d, name)
        t = (_read_json(path) or {}).get("chat_template")
        if isinstance(t, list):   # named templates: [{"name": "default", "template": ...}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            if t is None:
                raise ValueError(f"{path}: chat_template is a list without a 'default' template")
        if t is not None:
            if not isinstance(t, str):
                raise ValueError(f"{path}: chat_template must be a string, got {type(t).__name__}")
            return t, f"{path} (chat_template)"
    return None, None


class HFTokenizer:
    """A Hugging Face tokenizer.json (byte-level BPE as Llama-3's and SmolLM2's, or any other
    `tokenizers` model) with the special tokens and the chat template of the tokenizer_config.json
    (special_tokens_map.json, chat_template.jinja) beside it. No template: the Zephyr one."""

    def __init__(self, path):
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"{path}: a tokenizer.json needs the `tokenizers` library: "
                              "pip install tokenizers") from None
        self.path = os.fspath(path)
        self.dir = os.path.dirname(os.path.abspath(self.path))
        spec = _read_json(self.path)
        if not isinstance(spec, dict) or "model" not in spec:
            raise ValueError(f"{self.path}: not a tokenizer.json (no 'model')")
        full = tokenizers.Tokenizer.from_str(json.dumps(spec))
        # Encode without the post-processor: it only adds special tokens (we never ask it to) and, in
        # GPT-2's ByteLevel(trim_offsets=True), shrinks offsets to drop spaces, which would move the
        # supervised spans. Ids are identical either way.
        spec["post_processor"] = None
        self.tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
        cfg = {**(_read_json(os.path.join(self.dir, "special_tokens_map.json")) or {}),
               **(_read_json(os.path.join(self.dir, "tokenizer_config.json")) or {})}
        # the named special tokens transformers hands the template (its special_tokens_map)
        self.special_tokens = {k: _token_text(cfg[k]) for k in
                               ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                "mask_token") if isinstance(_token_text(cfg.get(k)), str)}
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        tid = lambda k: self.tk.token_to_id(self.special_tokens[k]) if k in self.special_tokens else None
        self.bos_id, self.unk_id, self.eos_token_id = tid("bos_token"), tid("unk_token"), tid("eos_token")
        for k, v in self.special_tokens.items():
            if self.tk.token_to_id(v) is None:
                raise ValueError(f"{self.dir}: {k} {v!r} is not a token of {self.path}")
        # BOS on plain text exactly when the tokenizer's own post-processor puts it first (Llama-3 yes, SmolLM2 no)
        self.add_bos = self.bos_id is not None and full.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.special_ids = {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}
        self.special_ids |= {i for i in (self.bos_id, self.eos_token_id) if i is not None}
        self.chat_template, self.template_name = _chat_template(self.dir)
        if self.chat_template is None:
            self.chat_template, self.template_name = ZEPHYR_TEMPLATE, "the Zephyr template (fallback)"
        # The token that closes an assistant turn in this template (<|eot_id|>, <|im_end|>, </s>):
        # supervised after every answer, and what generation stops on.
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
        text = self.render_text(probe)
        ids, offsets = self.encode_offsets(text)
        self.eos_id = ids[_turn_span(self, probe, 1, text, ids, offsets)[1] - 1]
        self.pad_id = next(i for i in (tid("pad_token"), self.unk_id, 0, 1)
                           if i is not None and i not in (self.eos_id, self.eos_token_id))

    def encode(self, text, dummy_prefix=True):
        """Ids, no BOS/EOS added; special-token texts become their ids (as in transformers)."""
        if not dummy_prefix:
            raise ValueError(f"{self.path}: non-legacy encoding is a sentencepiece option; tokenizer.json has its own rules")
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text):
        e = self.tk.encode(text, add_special_tokens=False)
        return e.ids, e.offsets   # character offsets into text

    def decode(self, ids):   # special tokens skipped, as the harness decodes generations
        return self.tk.decode([int(i) for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def text_of(self, ids):
        """The text of ids with special tokens spelled out."""
        return self.tk.decode([int(i) for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=False)

    def render_text(self, messages, add_generation_prompt=False, continue_final_message=False):
        return apply_template(self.chat_template, messages, self.special_tokens, add_generation_prompt,
                              continue_final_message, name=self.template_name)

    def files(self):
        """tokenizer.json and the files beside it that transformers reads with it."""
        out = {"tokenizer.json": self.path}
        for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
            if os.path.isfile(os.path.join(self.dir, name)):
                out[name] = os.path.join(self.dir, name)
        return out


def load_tokenizer(path):
    """Tokenizer or HFTokenizer from a tokenizer file (.model: sentencepiece; .json: tokenizer.json) or a
    checkpoint directory. A directory with tokenizer.model whose chat template is absent or Zephyr's
    (Mistral-7B-v0.1, mistral-7b-sft-beta, zephyr) keeps the sentencepiece rules the IFT paper's models
    were trained with; otherwise tokenizer.json with the checkpoint's own template (Llama-3, SmolLM2,
    Mistral-Instruct); tokenizer.json without a template gets the Zephyr one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        j, m = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
        if os.path.isfile(m) and (not os.path.isfile(j) or _is_zephyr(path)):
            return Tokenizer(m)
        if os.path.isfile(j):
            return HFTokenizer(j)
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model (pass --tokenizer=PATH)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def _is_zephyr(d):
    """Whether d's chat template is absent or renders exactly the Zephyr text (bos_token aside)."""
    template, name = _chat_template(d)
    if template is None:
        return True
    cfg = _read_json(os.path.join(d, "tokenizer_config.json")) or {}
    special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token") if isinstance(_token_text(cfg.get(k)), str)}
    if special.get("eos_token") != EOS_TEXT:
        return False
    probe = [{"role": r, "content": c} for r, c in (("system", "S"), ("user", "U"), ("assistant", "A"), ("user", "V"))]
    try:
        for gen in (False, True):
            text = apply_template(template, probe, special, gen, name=name)
            if text.removeprefix(special.get("bos_token", "")) != chat_text(probe, add_generation_prompt=gen):
                return False
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- chat templates (Jinja)
# Ours for a tokenizer.json that ships no template: the Zephyr text, BOS first (METHOD §5).
ZEPHYR_TEMPLATE = ("{% if bos_token is defined %}{{ bos_token }}{% endif %}{% for m in messages %}"
                   "{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "   # transformers' marker for continue_final_message


@functools.lru_cache(maxsize=16)
def _compile(template):
    """A template compiled the way transformers compiles chat templates: sandboxed, trim_blocks and
    lstrip_blocks, loop controls, raise_exception / strftime_now globals, a tojson that neither escapes
    HTML nor forces ASCII, and the {% generation %} tag (it only marks spans; we render its body)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def apply_template(template, messages, special_tokens, add_generation_prompt=False, continue_final_message=False,
                   name="chat template"):
    """The text transformers' apply_chat_template(..., tokenize=False) renders: messages,
    add_generation_prompt and the named special tokens (bos_token, eos_token, ...) as variables.
    continue_final_message: the text stops right after the last message's content (an assistant
    pre-fill), found with transformers' marker. A template error names the template."""
    try:
        import jinja2
    except ImportError:
        raise ImportError("chat templates need jinja2 (torch installs it): pip install jinja2") from None
    msgs = [dict(m) for m in messages]
    if continue_final_message:
        msgs[-1]["content"] += _CONTINUE_TAG
    try:
        text = _compile(template).render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"{name}: {type(e).__name__}: {e}") from None
    if continue_final_message:
        if messages[-1]["content"].strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ValueError(f"{name}: the final message does not appear in the rendered text; cannot continue it")
        at = text.rindex(_CONTINUE_TAG.strip())
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


_SENTINEL = "\x00nanoift-assistant-content\x00"


def _turn_span(tok, messages, i, text, ids, offsets):
    """(first, end) token indices of assistant message i in the encoded text: the tokens overlapping
    its content, through the end-of-turn token (the first special token after the content; template
    glue between the two, e.g. Llama-2's space before </s>, is part of the answer). Located, never
    guessed: render the conversation up to message i with a sentinel in place of its content; the
    text before the sentinel must equal the full text's, the content must follow it literally (or
    trimmed, for templates that | trim), and the end-of-turn token must come from this message's
    closing text. Otherwise it is an error naming the template."""
    where = f"{tok.template_name}: messages[{i}]"
    probe = tok.render_text(messages[:i] + [{"role": "assistant", "content": _SENTINEL}])
    k = probe.find(_SENTINEL)
    if k < 0 or probe.count(_SENTINEL) != 1 or text[:k] != probe[:k]:
        raise ValueError(f"{where}: cannot locate the assistant content (the template renders the text before "
                         f"it differently depending on what follows, or drops the content)")
    c = messages[i]["content"]
    c = next((v for v in (c, c.strip(), c.rstrip(), c.lstrip()) if text.startswith(v, k)), None)
    if c is None:
        raise ValueError(f"{where}: the template changes the assistant content; cannot place the supervised span")
    end, closing = k + len(c), probe[k + len(_SENTINEL):]
    first = next((j for j, (a, b) in enumerate(offsets) if b > k), len(ids))
    eot = next((j for j in range(first, len(ids)) if offsets[j][0] >= end and ids[j] in tok.special_ids), None)
    if eot is None or not closing.startswith(text[end:offsets[eot][1]]):
        raise ValueError(f"{where}: no special token closes the assistant turn (closing text {closing[:40]!r}); "
                         f"nothing would teach the model to stop")
    return first, eot + 1


def _render_template(tok, messages, add_generation_prompt, last_turn_only, continue_final_message):
    """render_chat for a tokenizer with a chat template: one rendering, one encoding, spans by offsets."""
    text = tok.render_text(messages, add_generation_prompt, continue_final_message)
    ids, offsets = tok.encode_offsets(text)
    labels = [IGNORE] * len(ids)
    if add_generation_prompt or continue_final_message:
        return ids, labels
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if last_turn_only else turns:
        a, b = _turn_span(tok, messages, i, text, ids, offsets)
        labels[a:b] = ids[a:b]
    return ids, labels


# ---------------------------------------------------------------------------- chat template
def chat_text(messages, add_generation_prompt=False):
    """The Zephyr template as text: each message "<|role|>\\n{content}</s>\\n"."""
    return "".join(f"<|{m['role']}|>\n{m['content']}{EOS_TEXT}\n" for m in messages) + \
        ("<|assistant|>\n" if add_generation_prompt else "")


def render_chat(tok, messages, *, add_generation_prompt=False, last_turn_only=False, legacy=True,
                continue_final_message=False):
    """(ids, labels). Labels: assistant content + its end-of-turn token (every assistant turn, or the
    last only), all else -100 (all of it with add_generation_prompt or continue_final_message).

    A tokenizer with a chat template (tokenizer.json): the template's text, encoded once; a token is
    supervised if it overlaps an assistant content or is the end-of-turn token after it (as
    transformers' assistant masks count tokens). A token merging the header's last characters with
    the content's first (a content starting with spaces, say) is supervised with it.
    continue_final_message: the prompt ends inside the last message (a pre-fill), as transformers.

    sentencepiece (chat_template None): Zephyr, in one pass. The pieces between EOS are
    "<|role|>\\n{content}" (first message), "\\n<|role|>\\n{content}" (the "\\n" closes the previous
    message) and the further parts of a content split at a literal "</s>". legacy=False: no dummy
    prefix on pieces after an EOS (HF non-legacy); the first piece keeps it in both modes."""
    if messages or not add_generation_prompt:   # a bare generation prompt is fine
        _check_messages(messages, "messages", "render_chat")
    if getattr(tok, "chat_template", None) is not None:
        if not legacy:
            raise ValueError(f"{tok.path}: non-legacy rendering is a sentencepiece option; the chat template decides")
        return _render_template(tok, messages, add_generation_prompt, last_turn_only, continue_final_message)
    if continue_final_message:
        raise ValueError(f"{tok.path}: continue_final_message needs a tokenizer with a chat template")
    ids, labels = [tok.bos_id], [IGNORE]
    last = max([i for i, m in enumerate(messages) if m["role"] == "assistant"], default=-1)
    enc = lambda text, first: tok.encode(text, dummy_prefix=legacy or first)
    for i, m in enumerate(messages):
        header = ("\n" if i else "") + f"<|{m['role']}|>\n"
        train = m["role"] == "assistant" and (i == last or not last_turn_only) and not add_generation_prompt
        for j, part in enumerate(m["content"].split(EOS_TEXT)):
            p, skip = enc(header + part if j == 0 else part, i == j == 0), 0
            if train and j == 0:   # the content starts after the header's tokens: verify, never guess
                h = enc(header, i == 0)
                if p[:len(h)] != h:
                    raise ValueError(f"messages[{i}]: the tokenizer merges the {m['role']} header into the "
                                     f"content {part[:20]!r}; cannot place the label boundary")
                skip = len(h)
            ids += p + [tok.eos_id]
            labels += [IGNORE] * skip + (p[skip:] + [tok.eos_id] if train else [IGNORE] * (len(p) - skip + 1))
    tail = ("\n" if messages else "") + ("<|assistant|>\n" if add_generation_prompt else "")
    if tail:   # the newline after the last EOS (masked), then the generation prompt
        t = enc(tail, not messages)
        ids, labels = ids + t, labels + [IGNORE] * len(t)
    return ids, labels


# ---------------------------------------------------------------------------- readers
def _check_messages(msgs, name, where):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: '{name}' must be a non-empty list of messages, got {msgs!r:.60}")
    for i, m in enumerate(msgs):
        f = f"{where}: {name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{f} must be an object with 'role' and 'content', got {m!r:.60}")
        if "role" not in m or "content" not in m:
            raise DataError(f"{f} has no '{'content' if 'role' in m else 'role'}' field")
        if m["role"] not in ROLES:
            raise DataError(f"{f}.role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{f}.content must be a string, got {type(m['content']).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


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
        return _check_messages(row["chosen"], "chosen", where), _check_messages(row["rejected"], "rejected", where)
    if "messages" in row:
        return _check_messages(row["messages"], "messages", where), None
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
    import eval_gen   # imported here: eval_gen builds on this module
    try:
        if "answerKey" in row:
            q = eval_gen.parse_arc(row, where)
            answer = f"{eval_gen.ARC_PREFILL} {eval_gen.LETTERS[q['gold']]}."
            return [{"role": "user", "content": eval_gen.arc_user_message(q)}, {"role": "assistant", "content": answer}]
        q = eval_gen.parse_gsm8k(row, where)
    except eval_gen.TaskDataError as e:
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


def train_tokenizer(texts, prefix_path, vocab_size=512):
    """sentencepiece BPE with Mistral's settings, written atomically to <prefix>.model. Texts go in
    line by line from memory (no temp files): like Mistral's, the model never sees a newline, so "\\n"
    is a byte token that never merges with its neighbours. "<|user|>" etc. stay ordinary text, as in
    the real tokenizer. vocab_size is an upper bound (small corpora may give fewer pieces)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for t in texts for line in t.split("\n") if line), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = os.fspath(prefix_path) + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(buf.getvalue())
    os.replace(path + ".tmp", path)
    return Tokenizer(path)


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
    import flags
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
