"""Llama-3 and other Hugging Face chat checkpoints: tokenizer.json + the checkpoint's own chat template
(ids equal transformers' apply_chat_template, exact supervised spans), llama3 RoPE scaling parity, and
train.py / eval_gen.py end to end on a tiny tokenizer.json checkpoint. Tokenizers are trained here."""
import builtins
import importlib.util
import json
import os

import pytest
import torch

from generate import generate
from infra import hf_io
from infra.hf_io import CheckpointError
from model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


# ------------------------------------------------------------------------------ llama3 rope scaling
def hf_llama3(vocab=101, tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
                                   tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    m = transformers.LlamaForCausalLM(cfg)
    m.config._attn_implementation = "sdpa"   # ours is SDPA too: eager alone differs by ~1.5e-5 here
    with torch.no_grad():   # large init: RoPE errors move logits far beyond 1e-5
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.3)
    return m.eval()


def test_llama3_rope_scaling_logits_match_transformers(tmp_path):
    hf = hf_llama3()
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_io.load_model(tmp_path / "hf").eval()
    assert ours.args.rope_scaling == LLAMA3_ROPE and ours.args.rope_theta == 500000.0
    x = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None].expand(2, -1) + 300   # past original_max_position_embeddings (64)
    with torch.no_grad():
        ref = hf(x, position_ids=pos).logits
        assert (ours(x, position_ids=pos) - ref).abs().max().item() <= 1e-5
        plain = Transformer(ModelArgs(**{**vars(ours.args), "rope_scaling": None}))
        plain.load_state_dict(ours.state_dict())
        assert (plain(x, position_ids=pos) - ref).abs().max().item() > 1e-2   # the scaling matters here
        # our checkpoint (4.x dialect: top-level rope_theta + rope_scaling) reads back in transformers
        hf_io.save_model(ours, tmp_path / "ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="sdpa").eval()
        assert (back(x, position_ids=pos).logits - ref).abs().max().item() <= 1e-5
        # and generation (its own RoPE tables) continues the way a full forward does
        out = generate(ours, [x[0, :12].tolist()], 6)[0]
        full = ours(torch.tensor([x[0, :12].tolist() + out[:-1]]))[0, 11:].argmax(-1).tolist()
        assert out == full


def test_rope_types_read_and_refused():
    base = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                vocab_size=50, rope_theta=500000.0)
    a = hf_io.args_from_hf_config({**base, "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}})
    assert a.rope_scaling == LLAMA3_ROPE                      # old "type" key
    b = hf_io.args_from_hf_config({**base, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}})
    assert b.rope_scaling == LLAMA3_ROPE and b.rope_theta == 500000.0   # transformers 5.x dialect
    assert hf_io.args_from_hf_config({**base, "rope_scaling": None}).rope_scaling is None
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        hf_io.args_from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="cfg.json: rope type 'llama3' needs high_freq_factor"):
        hf_io.args_from_hf_config({**base, "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items()
                                                           if k != "high_freq_factor"}}, "cfg.json")


# ------------------------------------------------------------------------------ tokenizer.json + template
import data  # noqa: E402
import tokenizer

# Everything below needs the optional `tokenizers`; the RoPE tests above do not.
needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="tokenizers is not installed (pip install tokenizers)")

# Modelled on the real ones: SmolLM2-Instruct's ChatML (with its default system prompt) and
# Llama-3-Instruct's (BOS in the template, | trim on every content).
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named Tiny<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# The same Llama-3 template with transformers' {% generation %} markers: its assistant masks are our oracle.
LLAMA3_GEN = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\\n\\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
              "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
              "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
CONFIG = {"chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                     "unk_token": "<|endoftext|>", "chat_template": CHATML},
          # eos = the base model's <|end_of_text|>: the end-of-turn token must still come out as <|eot_id|>
          "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "chat_template": LLAMA3}}

M = lambda role, content: {"role": role, "content": content}
CONVERSATIONS = [
    [M("user", "What is 2 + 3?"), M("assistant", "2 + 3 = 5")],
    [M("system", "Answer with the result only."), M("user", "Sort the list 3 1 2."), M("assistant", "1 2 3")],
    [M("user", "Hi  there"), M("assistant", "Héllo wörld 😀, café!"), M("user", "again?"),          # multi-turn,
     M("assistant", " yes\n\nof course \n"), M("user", "and <|im_end|> too"), M("assistant", "done")],  # spaces
    [M("user", "Reverse the list 4 5 6."), M("assistant", "")],                                     # empty answer
]


def corpus():
    lines = [m["content"] for c in CONVERSATIONS for m in c] + [r["messages"][-1]["content"] for r in data.synthetic_task(60, 3)]
    lines += ["system user assistant You are a helpful AI assistant named Tiny", "\n\n", "\n  yes", "The best answer is A."]
    return lines * 3


def write_tokenizer(d, kind, vocab_size=400):
    """A tiny byte-level BPE tokenizer.json: GPT-2-style for ChatML (ByteLevel post-processor that trims
    offsets), Llama-3-style (its split regex, TemplateProcessing adding BOS) for Llama-3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    if kind == "chatml":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL[kind], show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "chatml":
        tk.post_processor = processors.ByteLevel(trim_offsets=True)
    else:
        bos = ("<|begin_of_text|>", tk.token_to_id("<|begin_of_text|>"))
        tk.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1", special_tokens=[bos])])
    os.makedirs(d, exist_ok=True)
    tk.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, **CONFIG[kind]}, f)
    return os.path.join(d, "tokenizer.json")


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def kind_dir(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp(request.param))
    write_tokenizer(d, request.param)
    return request.param, d


def hf_ids(hf, msgs, **kw):
    out = hf.apply_chat_template(msgs, tokenize=True, **kw)
    return list(out if isinstance(out, list) else out["input_ids"])


def runs(labels):
    """[(start, end)] of the supervised runs."""
    out, i = [], 0
    while i < len(labels):
        if labels[i] == tokenizer.IGNORE:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != tokenizer.IGNORE:
            j += 1
        out.append((i, j))
        i = j
    return out


@needs_tokenizers
def test_ids_equal_transformers_and_supervised_spans_are_the_answers(kind_dir):
    kind, d = kind_dir
    tok = tokenizer.load_tokenizer(d)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(d)
    eot = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[kind]
    assert isinstance(tok, tokenizer.HFTokenizer) and tok.eos_id == tok.tk.token_to_id(eot)
    assert tok.add_bos == (kind == "llama3") and tok.pad_id not in (tok.eos_id, tok.eos_token_id)
    assert tok.add_bos == (hf("x")["input_ids"][:1] == [tok.bos_id])
    trim = (lambda s: s.strip()) if kind == "llama3" else (lambda s: s)
    for msgs in CONVERSATIONS:
        ids, labels = tokenizer.render_chat(tok, msgs)
        assert ids == hf_ids(hf, msgs), msgs
        assert len(labels) == len(ids) and all(x in (tokenizer.IGNORE, i) for x, i in zip(labels, ids))
        answers = [trim(m["content"]) + eot for m in msgs if m["role"] == "assistant"]
        assert [tok.text_of(ids[a:b]) for a, b in runs(labels)] == answers
        ids1, labels1 = tokenizer.render_chat(tok, msgs, last_turn_only=True)
        assert ids1 == ids and [tok.text_of(ids[a:b]) for a, b in runs(labels1)] == answers[-1:]
        prompt, pl = tokenizer.render_chat(tok, msgs[:-1], add_generation_prompt=True)
        assert prompt == hf_ids(hf, msgs[:-1], add_generation_prompt=True) and set(pl) == {tokenizer.IGNORE}
        assert ids[:len(prompt)] == prompt                   # the answer follows its generation prompt
    if kind == "llama3":
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1          # the template's BOS, once
    # the arc_gen pre-fill: transformers' continue_final_message
    msgs = [M("user", "Which is it?"), M("assistant", "The best answer is")]
    got, gl = tokenizer.render_chat(tok, msgs, continue_final_message=True)
    assert got == hf_ids(hf, msgs, continue_final_message=True) and set(gl) == {tokenizer.IGNORE}
    assert tok.text_of(got).endswith("assistant" + ("\n" if kind == "chatml" else "<|end_header_id|>\n\n") + "The best answer is")


@needs_tokenizers
def test_labels_equal_transformers_assistant_masks(tmp_path):
    """transformers marks {% generation %} spans itself: our labels on the unmarked template must agree."""
    write_tokenizer(str(tmp_path), "llama3")
    tok = tokenizer.load_tokenizer(str(tmp_path))
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    ours = [tokenizer.render_chat(tok, msgs) for msgs in CONVERSATIONS]
    for msgs, (ids, labels) in zip(CONVERSATIONS, ours):
        out = hf.apply_chat_template(msgs, chat_template=LLAMA3_GEN, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert list(out["input_ids"]) == ids
        assert [int(x != tokenizer.IGNORE) for x in labels] == list(out["assistant_masks"]), msgs
    tok.chat_template = LLAMA3_GEN                     # our Jinja environment knows the tag and renders its body
    assert [tokenizer.render_chat(tok, msgs) for msgs in CONVERSATIONS] == ours


@needs_tokenizers
def test_header_token_merged_into_the_content_is_supervised(tmp_path):
    """GPT-2's regex makes "\\n " one pre-token: with a content starting "  yes" the token "\\n " holds the
    header's newline and the content's first space. It is supervised (it starts the answer), as in
    transformers' assistant masks; ids are still transformers'."""
    write_tokenizer(str(tmp_path), "chatml")
    tok = tokenizer.load_tokenizer(str(tmp_path))
    nl_space = tok.tk.token_to_id("Ċ") is not None and tok.encode("\n ")
    msgs = [M("user", "Hi"), M("assistant", "  yes")]
    ids, labels = tokenizer.render_chat(tok, msgs)
    assert len(nl_space) == 1, "the tiny vocabulary should have merged '\\n ' into one token"
    (a, b), = runs(labels)
    assert ids[a] == nl_space[0] and tok.text_of(ids[a:b]) == "\n  yes<|im_end|>"


@needs_tokenizers
def test_load_tokenizer_choice(tmp_path):
    sp_dir = tmp_path / "sp"
    sp = tokenizer.train_tokenizer(data.corpus_text(data.synthetic_task(50, 0)), str(sp_dir / "tokenizer"), 300)
    assert isinstance(tokenizer.load_tokenizer(str(sp_dir)), tokenizer.Tokenizer)            # tokenizer.model alone
    assert isinstance(tokenizer.load_tokenizer(sp.path), tokenizer.Tokenizer)
    # + tokenizer.json with Zephyr's template (mistral-7b-sft-beta, zephyr): still the sentencepiece rules
    write_tokenizer(str(sp_dir), "chatml")
    zephyr = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
              "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
              "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
              "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
    cfg_path = sp_dir / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": zephyr}))
    assert isinstance(tokenizer.load_tokenizer(str(sp_dir)), tokenizer.Tokenizer)
    # + its own (non-Zephyr) template: tokenizer.json and that template
    cfg_path.write_text(json.dumps(CONFIG["chatml"]))
    t = tokenizer.load_tokenizer(str(sp_dir))
    assert isinstance(t, tokenizer.HFTokenizer) and t.chat_template == CHATML and t.template_name.startswith(str(cfg_path))
    assert isinstance(tokenizer.load_tokenizer(sp.path), tokenizer.Tokenizer)                # a file overrides
    # tokenizer.json without a template: Zephyr, BOS first, as the sentencepiece path renders it
    j = tmp_path / "nt"
    write_tokenizer(str(j), "chatml")
    (j / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    t = tokenizer.load_tokenizer(str(j / "tokenizer.json"))
    msgs = CONVERSATIONS[1]
    assert t.template_name == "the Zephyr template (fallback)"
    assert t.render_text(msgs) == "<|im_start|>" + tokenizer.chat_text(msgs).replace("</s>", "<|im_end|>")
    ids, labels = tokenizer.render_chat(t, msgs)
    assert [t.text_of(ids[a:b]) for a, b in runs(labels)] == ["1 2 3<|im_end|>"]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        tokenizer.load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        tokenizer.load_tokenizer(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] | replace('yes', 'YES') + '<|im_end|>' }}{% endfor %}",
     r"messages\[1\]: the template changes the assistant content"),
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '<|im_end|>' }}{% endfor %}",
     "cannot locate the assistant content"),
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}",
     "no special token closes the assistant turn"),
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
     "{{ m['content'] + '<|im_end|>' }}{% endfor %}", "TemplateError: no system role"),
    ("{% for m in messages %}{{ messages | length | string + m['content'] + '<|im_end|>' }}{% endfor %}",
     r"messages\[2\]: cannot locate the assistant content"),
    ("{% for m in messages %}{{ m['content'] + '<|im_end|>' }}{% endfor", "TemplateSyntaxError"),
])
@needs_tokenizers
def test_template_errors_name_the_template(tmp_path, template, match):
    write_tokenizer(str(tmp_path), "chatml")
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({**CONFIG["chatml"], "chat_template": template}))
    msgs = [M("system", "S"), M("user", "hi"), M("assistant", "yes"), M("user", "and?"), M("assistant", "no")]
    with pytest.raises(ValueError, match=match) as e:
        tokenizer.render_chat(tokenizer.load_tokenizer(str(tmp_path)), msgs[1:] if "'yes'" in template else msgs)
    assert str(cfg) in str(e.value)


@needs_tokenizers
def test_template_environment_matches_transformers(tmp_path):
    """strftime_now, tojson (non-ASCII kept, no HTML escaping), loop controls, namespace."""
    write_tokenizer(str(tmp_path), "chatml")
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                "{% set ns.n = ns.n + 1 %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{{ {'k': 'é<&>'} | tojson }}{{ strftime_now('%Y') }}{{ ns.n }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**CONFIG["chatml"], "chat_template": template}))
    tok = tokenizer.load_tokenizer(str(tmp_path))
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    msgs = CONVERSATIONS[1]
    assert tok.render_text(msgs) == hf.apply_chat_template(msgs, tokenize=False)
    assert '{"k": "é<&>"}' in tok.render_text(msgs)


@needs_tokenizers
def test_inspection_command_any_tokenizer(tmp_path, capsys):
    write_tokenizer(str(tmp_path / "l3"), "llama3")
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    data.main(["--tokenizer", str(tmp_path / "l3"), "--data", str(rows)])
    out = capsys.readouterr().out
    assert "template: " + str(tmp_path / "l3" / "tokenizer_config.json") in out
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n⟦2 + 3 = 5<|eot_id|>⟧" in out
    assert out.split("\n", 1)[1].count("⟦") == 1 and "<|begin_of_text|><|start_header_id|>user" in out


# ------------------------------------------------------------------------------ train.py / eval_gen.py end to end
ARC = [{"id": "q1", "question": {"stem": "Which one is a color?", "choices": [
            {"text": "red", "label": "A"}, {"text": "dog", "label": "B"}, {"text": "five", "label": "C"},
            {"text": "run", "label": "D"}]}, "answerKey": "A"},
       {"id": "q2", "question": "What do plants need to grow?", "choices": {"text": ["sand only", "light and water", "noise"],
                                                                               "label": ["1", "2", "3"]}, "answerKey": "2"}]
GSM = [{"question": "Tom has 2 apples and buys 3 more. How many apples does he have?", "answer": "2 + 3 = 5\n#### 5"},
       {"question": "A box holds 4 pens. How many pens are in 2 boxes?", "answer": "4 * 2 = 8\n#### 8"}]


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory):
    """A tiny random Llama-3.1-style checkpoint (llama3 RoPE scaling) with the Llama-3-style tokenizer."""
    d = tmp_path_factory.mktemp("l3ckpt")
    tok = tokenizer.HFTokenizer(write_tokenizer(str(d / "tok"), "llama3"))
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=48, vocab_size=tok.vocab_size,
                     sliding_window=None, max_position_embeddings=2048, model_type="llama", rope_theta=500000.0,
                     rope_scaling=dict(LLAMA3_ROPE), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    hf_io.save_model(Transformer(args).init_weights(std=0.3, seed=0), str(d / "model"))
    hf_io.save_model(Transformer(args).init_weights(std=0.3, seed=0), str(d / "full"), extra_files=tok.files())
    rows = data.synthetic_pairs(16, 5)
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.mark.parametrize("loss", ["sft", "ift", "dpo"])
@needs_tokenizers
def test_train_on_tokenizer_json_checkpoint_and_output_loads_in_transformers(llama3_ckpt, tmp_path, loss):
    import train
    d = llama3_ckpt
    # sft: a model dir without tokenizer files + --tokenizer; ift/dpo: the tokenizer found in init_from
    src = [f"--init_from={d / 'model'}", f"--tokenizer={d / 'tok' / 'tokenizer.json'}"] if loss == "sft" else \
        [f"--init_from={d / 'full'}"]
    summary = train.main(src + [f"--data={d / 'rows.jsonl'}", f"--loss={loss}", "--max_steps=2", "--micro_batch_size=4",
                                "--gen_eval=0", "--progress=false", "--log_every=1", "--lr=1e-3", f"--out_dir={tmp_path}"])
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(recs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    if loss == "dpo":
        assert abs(recs[0]["loss"] - 0.6931471805599453) < 1e-5     # policy == reference at step 0
    ck = summary["checkpoint"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(os.listdir(ck))
    ours_tok = tokenizer.load_tokenizer(ck)
    hf_tok = transformers.AutoTokenizer.from_pretrained(ck)
    msgs = CONVERSATIONS[2]
    assert ours_tok.chat_template == LLAMA3 and tokenizer.render_chat(ours_tok, msgs)[0] == hf_ids(hf_tok, msgs)
    ours = hf_io.load_model(ck).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(ck, attn_implementation="sdpa").eval()
    x = torch.tensor([tokenizer.render_chat(ours_tok, msgs)[0]])
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5
    init = hf_io.load_model(str(d / "model"))
    assert (ours.norm.weight - init.norm.weight).abs().max() > 1e-5          # it did train


@needs_tokenizers
def test_eval_gen_on_tokenizer_json_checkpoint(llama3_ckpt, tmp_path):
    import eval_gen as E
    ck = str(llama3_ckpt / "full")
    arc, gsm = tmp_path / "arc.jsonl", tmp_path / "gsm.jsonl"
    arc.write_text("".join(json.dumps(r) + "\n" for r in ARC))
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    tok = tokenizer.load_tokenizer(ck)
    hf_tok = transformers.AutoTokenizer.from_pretrained(ck)
    q = E.load_task("arc_gen", str(arc))[0]
    msgs = [M("user", E.arc_user_message(q)), M("assistant", E.ARC_PREFILL)]
    # the prompt lm-eval's --apply_chat_template builds: pre-filled assistant turn, the template's BOS
    assert E.arc_gen_prompt(tok, q) == hf_ids(hf_tok, msgs, continue_final_message=True)
    assert E.arc_gen_prompt(tok, q)[0] == tok.bos_id and E.arc_gen_prompt(tok, q, bos=False)[0] != tok.bos_id
    assert E.arc_prompt_text(q, tok) == hf_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert tok.eos_id in E.stop_token_ids(tok, E.ARC_STOPS) and tok.text_of([tok.eos_id]) == "<|eot_id|>"
    # plain text: BOS as the tokenizer adds it (Llama-3 yes; ChatML-style no)
    ctx, cont = E.encode_pair(tok, "Question: a\nAnswer:", " red")
    assert ctx + cont == hf_tok("Question: a\nAnswer: red")["input_ids"] and ctx[0] == tok.bos_id
    chatml = tokenizer.load_tokenizer(write_tokenizer(str(tmp_path / "chatml"), "chatml"))
    assert E.encode_pair(chatml, "Question: a\nAnswer:", " red")[0][0] != chatml.bos_id
    out = tmp_path / "out"
    for task, extra in (("arc_gen", []), ("arc_ll", ["--fewshot_data", str(arc), "--num_fewshot", "1"]),
                        ("gsm8k", ["--fewshot_data", str(gsm), "--num_fewshot", "1", "--max_new_tokens", "8"])):
        E.main(["--model", ck, "--task", task, "--data", str(gsm if task == "gsm8k" else arc), "--out", str(out),
                "--device", "cpu", "--batch_size", "2"] + extra + (["--max_new_tokens", "8"] if task == "arc_gen" else []))
        summary = json.load(open(out / f"{task}_summary.json"))
        recs = [json.loads(line) for line in open(out / f"{task}.jsonl")]
        assert summary["n"] == 2 and len(recs) == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert recs[0]["prompt"].startswith("Question: ")   # gsm8k: plain text, no template
    recs = [json.loads(line) for line in open(out / "arc_gen.jsonl")]
    assert recs[0]["prompt"] == E.arc_prompt_text(q, tok) and recs[1]["gold"] == "B"


def test_tokenizer_json_without_tokenizers_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tokenizers(name, *a, **k):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install tokenizers"):
        tokenizer.load_tokenizer(str(tmp_path))
