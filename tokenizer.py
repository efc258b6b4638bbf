"""
Tokenizers and chat templates: conversations rendered straight to token ids and labels (METHOD §5).

Two implementations of one duck-typed interface (load_tokenizer picks): a sentencepiece model
(Tokenizer: Mistral v0.1, the demo's trained one) and a Hugging Face tokenizer.json with the checkpoint's
own Jinja chat template (HFTokenizer: Llama-3, SmolLM2, ...).

Token rule of the sentencepiece route (HF's "legacy" Llama/Mistral tokenizer): split the rendered text at
every "</s>", encode each piece with sentencepiece (each gets the dummy-prefix "▁"), join with the EOS id,
prepend BOS. So a literal "</s>" inside a message becomes the EOS id, as the HF tokenizer of those models
makes it (inside an assistant turn it is supervised like the rest of the answer; data.load_* count such
rows). Pieces are encoded by sentencepiece itself: HF's *fast* tokenizer differs on runs of spaces.

tokenizer.json route: the conversation is rendered to text by the checkpoint's own template exactly as
transformers' apply_chat_template does, and that text is encoded once (special-token texts become their
ids). The supervised tokens are found from character spans (where each assistant content sits in the
rendered text) and the tokenizer's offsets; see render_chat.
"""
import datetime
import functools
import io
import json
import os

from infra import atomic


IGNORE = -100                          # label of a token that is not supervised
ROLES = ("system", "user", "assistant")
EOS_TEXT = "</s>"


class DataError(ValueError):
    """Bad input data or a bad --data value, a user error: the message starts with the file and
    line ("file:3") or row ("file row 3") and names the field. The command lines print it as one line."""


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
        check_messages(messages, "messages", "render_chat")
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
def check_messages(msgs, name, where):
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
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
    atomic.write_file(path, write)
    return Tokenizer(path)
