"""Chat templates against `transformers.apply_chat_template`, token for token, on real templates.

Templates (tests/fixtures/chat-templates, sources in tests/fixtures/README.md): Qwen2.5-Instruct's, Qwen3's (a
`<think>` block on the replies after the last user query, `reasoning_content`, `enable_thinking`), Llama-3.2-Instruct's
(it calls `strftime_now`), OLMo 2 Instruct's, Gemma 2's and Gemma 3's, Phi-3's and Zephyr / TinyLlama-Chat's on a
SentencePiece-style tokenizer, and two templates with `{% generation %}` markers: TRL's Qwen2.5 training template and
the template of SmolLM3's SFT recipe (tools, `enable_thinking`, `strftime_now`). Each folder is written the way
current transformers writes one (the template in chat_template.jinja) and loaded by both sides from the same files.
"""
from __future__ import annotations

import datetime
import gzip
import json
import shutil
from pathlib import Path

import pytest

from rlhf_jax.data.batching import tokenize_preference, tokenize_sft
from rlhf_jax.data.records import PreferenceRecord, SFTRecord
from rlhf_jax.tokenizer import HFTokenizer, encode_chat, encode_prompt

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "chat-templates"

# Replies that start or end with whitespace (the boundary cases), multi-turn, a system turn, non-ASCII text.
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello! How can I help?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4 "},
     {"role": "user", "content": "And  3+3?\n"}, {"role": "assistant", "content": "6.\n\n"},
     {"role": "user", "content": "Snow?"}, {"role": "assistant", "content": "No. ☃ é"}],
]

SPECIALS = {
    "qwen2_5": dict(eos="<|im_end|>", extra=["<|im_start|>", "<|im_end|>"], bos=None),
    "qwen2_5_training": dict(eos="<|im_end|>", extra=["<|im_start|>", "<|im_end|>"], bos=None),
    "smollm3_sft": dict(eos="<|im_end|>", extra=["<|im_start|>", "<|im_end|>"], bos=None),
    "qwen3": dict(eos="<|im_end|>", extra=["<|im_start|>", "<|im_end|>", "<think>", "</think>"], bos=None),
    "olmo2": dict(eos="<|endoftext|>", bos="<|endoftext|>", extra=["<|pad|>"]),
    "gemma2": dict(eos="<eos>", bos="<bos>", extra=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "gemma3": dict(eos="<eos>", bos="<bos>", extra=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "llama3_2": dict(eos="<|eot_id|>", bos="<|begin_of_text|>",
                     extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "zephyr": dict(eos="</s>", bos="<s>", extra=[]),
    "phi3": dict(eos="<|endoftext|>", bos="<s>", extra=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                                         "<|endoftext|>"]),
}


def _folder(tmp_path: Path, name: str) -> Path:
    """A tokenizer folder as transformers >= 4.47 writes it: tokenizer.json, tokenizer_config.json without the
    template, chat_template.jinja. GPT-2's byte-level BPE for the Qwen, Llama-3, OLMo 2, SmolLM3 and Gemma templates
    (the same kind of tokenizer as all but Gemma's; Gemma's own is a SentencePiece BPE, but what is tested here is the
    template), the SentencePiece-style one (class LlamaTokenizer) for Zephyr and Phi-3."""
    from tokenizers import AddedToken, Tokenizer

    spec = SPECIALS[name]
    out = tmp_path / name
    out.mkdir()
    sentencepiece = name in ("zephyr", "phi3")
    if sentencepiece:
        tok = Tokenizer.from_file(str(FIXTURES / "sentencepiece-style" / "tokenizer.json"))
    else:
        with gzip.open(FIXTURES / "gpt2-tokenizer" / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
            tok = Tokenizer.from_str(f.read())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["extra"]])
    tok.save(str(out / "tokenizer.json"))
    config = {"eos_token": spec["eos"], "bos_token": spec["bos"], "add_bos_token": False}
    if sentencepiece:
        config.update(tokenizer_class="LlamaTokenizer", unk_token="<unk>", legacy=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copyfile(TEMPLATES / f"{name}.jinja", out / "chat_template.jinja")
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """`loaded(name)`: (ours, transformers') tokenizers of a template's folder, loaded once for the module (the tests
    only read them)."""
    cache = {}

    def load(name):
        if name not in cache:
            folder = _folder(tmp_path_factory.mktemp(name), name)
            cache[name] = (HFTokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(str(folder)))
        return cache[name]

    return load


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(SPECIALS))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_ids_match_apply_chat_template(loaded, name, conv):
    ours, ref = loaded(name)
    messages = CONVERSATIONS[conv]
    assert ours.chat_format is not None and ours.chat_format.template == ref.chat_template  # read from the .jinja
    if name == "gemma2" and messages[0]["role"] == "system":  # Gemma 2's template refuses a system turn; so do we
        with pytest.raises(Exception, match="System role not supported"):
            ref.apply_chat_template(messages, tokenize=False)
        with pytest.raises(ValueError, match="System role not supported"):
            encode_chat(ours, messages)
        return
    ids, mask = encode_chat(ours, messages)
    assert ids == _ids(ref.apply_chat_template(messages, tokenize=True))
    for k in range(1, len(messages), 2):  # every rollout prompt: the conversation up to a reply
        prompt = encode_prompt(ours, messages[:k])
        assert prompt == _ids(ref.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True))
    assert len(mask) == len(ids) and sum(mask) > 0


@pytest.mark.parametrize("name", ["qwen2_5_training", "smollm3_sft"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_generation_markers_give_transformers_assistant_masks(loaded, name, conv):
    ours, ref = loaded(name)
    messages = CONVERSATIONS[conv]
    ids, mask = encode_chat(ours, messages)
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])


END_OF_TURN = {"qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3_2": "<|eot_id|>", "olmo2": "<|endoftext|>",
               "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "zephyr": "</s>", "phi3": "<|end|>"}


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_loss_covers_each_reply_and_its_end_of_turn(loaded, name):
    """Without generation markers: every token overlapping a reply's rendered text, through its first EOS."""
    ours, _ = loaded(name)
    messages = CONVERSATIONS[1][1:] if name == "gemma2" else CONVERSATIONS[1]  # Gemma 2 has no system turn
    ids, mask = encode_chat(ours, messages)
    lossy = ours._tok.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False)
    for m in messages:
        assert (m["content"].strip() in lossy) == (m["role"] == "assistant"), (m, lossy)
    assert lossy.count(END_OF_TURN[name]) == 3  # each of the three replies ends its turn inside the loss
    assert mask[0] == 0 and sum(mask) < len(mask) // 2


def test_reply_starting_with_newlines_merges_across_the_turn_boundary(tmp_path):
    """Qwen2.5 renders "<|im_start|>assistant\\n" + "\\n\\nHello": GPT-2's pre-tokenizer makes one "\\n\\n" token
    (id 628) of the header's newline and the reply's first one, as transformers does (message by message gave 198
    there). That token starts the reply's loss; the rollout prompt ends with the header's own "\\n" (198)."""
    ours = HFTokenizer.from_file(_folder(tmp_path, "qwen2_5"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello!"}]
    ids, mask = encode_chat(ours, messages)
    prompt = encode_prompt(ours, messages[:1])
    n = len(prompt) - 1
    assert prompt[-1] == 198 and ids[:n] == prompt[:n] and ids[n] == 628 and mask[n] == 1 and mask[n - 1] == 0
    ex = tokenize_sft(ours, SFTRecord(messages=tuple(messages)))
    assert ex.prompt_len == n and ex.mask[n] == 1 and sum(ex.mask[:n]) == 0


def test_llama3_date_comes_from_strftime_now(tmp_path):
    ours = HFTokenizer.from_file(_folder(tmp_path, "llama3_2"))
    text = ours.decode(encode_prompt(ours, CONVERSATIONS[0][:1]))
    assert "Today Date: " + datetime.datetime.now().strftime("%d %b %Y") in text


def test_sentencepiece_turns_start_as_transformers(tmp_path):
    """A Llama-class tokenizer.json read raw prepends "▁" after every special token ("</s>" then "▁\\n<|..."); both
    transformers 5 and we rebuild it with a Metaspace pre-tokenizer that prepends only at the very start."""
    folder = _folder(tmp_path, "zephyr")
    ours = HFTokenizer.from_file(folder)
    ids, _ = encode_chat(ours, CONVERSATIONS[1])
    tokens = [ours._tok.id_to_token(i) for i in ids]
    eos = [k for k, t in enumerate(tokens) if t == "</s>"]
    assert len(eos) == 7 and all(tokens[k + 1] == "\n" for k in eos[:-1])


def test_preference_pair_shares_the_prompt_tokens(tmp_path):
    ours = HFTokenizer.from_file(_folder(tmp_path, "qwen2_5"))
    rec = PreferenceRecord(prompt=({"role": "user", "content": "Hi"},), chosen=" Hello.", rejected="\nGo away.")
    chosen, rejected = tokenize_preference(ours, rec)
    for ex in (chosen, rejected):
        assert sum(ex.mask[: ex.prompt_len]) == 0 and ex.mask[ex.prompt_len] == 1
    assert chosen.ids[: chosen.prompt_len] == rejected.ids[: rejected.prompt_len]


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """A template that renders a turn differently once later turns follow (here: only the last reply is shown) has
    no place for earlier replies; the error says to use generation markers."""
    from rlhf_jax.tokenizer import ChatFormat, ByteTokenizer

    fmt = ChatFormat(template="{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                              "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="generation"):
        encode_chat(ByteTokenizer(), CONVERSATIONS[1], fmt)


def test_chat_template_jinja_wins_over_the_config(tmp_path):
    folder = _folder(tmp_path, "qwen2_5")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'old' }}"}))
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert HFTokenizer.from_file(folder).chat_format.template == ref.chat_template != "{{ 'old' }}"


# ------------------------------------------------------------------------------------------------ tools
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# user -> tool call -> result -> answer -> user -> tool call (with text) -> result -> answer
TOOL_CONVERSATION = [
    {"role": "system", "content": "You check facts with tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris", "unit": "C"})]},
    {"role": "tool", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
    {"role": "user", "content": "And 2+3?"},
    {"role": "assistant", "content": "Let me add.", "tool_calls": [_call("add", {"a": 2, "b": 3})]},
    {"role": "tool", "name": "add", "content": "5"},
    {"role": "assistant", "content": "2+3 = 5."},
]
PARALLEL = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", {"city": "Paris"}),
                                                          _call("get_weather", {"city": "Oslo"})]},
    {"role": "tool", "content": "21"},
    {"role": "tool", "content": "-3"},
    {"role": "assistant", "content": "Paris 21, Oslo -3."},
]
NOT_CALLED = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
STRING_ARGUMENTS = [  # the OpenAI layout: arguments as a JSON string (templates quote it again, as given)
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "tool_calls": [_call("add", '{"a": 2, "b": 3}')]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "5"},
]
TOOL_CASES = {"conversation": TOOL_CONVERSATION, "parallel": PARALLEL, "not_called": NOT_CALLED,
              "string_arguments": STRING_ARGUMENTS}


TOOL_TEMPLATES = ("qwen2_5", "qwen3", "llama3_2", "smollm3_sft")  # the templates that take tools


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_tools_match_apply_chat_template(loaded, name, case):
    from rlhf_jax.tokenizer import render_template

    ours, ref = loaded(name)
    messages = TOOL_CASES[case]
    if name == "llama3_2" and case == "parallel":  # Llama-3.2's template refuses parallel calls; so do we
        with pytest.raises(Exception, match="single tool-calls"):
            ref.apply_chat_template(messages, tools=TOOLS, tokenize=False)
        with pytest.raises(ValueError, match="single tool-calls"):
            encode_chat(ours, messages, tools=TOOLS)
        return
    text = render_template(ours.chat_format.template, messages, tools=TOOLS, bos_token=ours.bos_token or "",
                           eos_token=ours.eos_token)
    assert text == ref.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    ids, _ = encode_chat(ours, messages, tools=TOOLS)
    assert ids == _ids(ref.apply_chat_template(messages, tools=TOOLS, tokenize=True))
    for k, m in enumerate(messages):  # every rollout prompt: the conversation up to an assistant turn
        if m["role"] == "assistant":
            prompt = encode_prompt(ours, messages[:k], tools=TOOLS)
            assert prompt == _ids(ref.apply_chat_template(messages[:k], tools=TOOLS, add_generation_prompt=True))
            n = len(prompt) - 1  # the header's last token may merge with the reply's first (see above)
            assert ids[:n] == prompt[:n]


# What each template writes for the assistant turns of TOOL_CONVERSATION, end of turn included (from the
# templates' text: Qwen2.5 puts calls in <tool_call> blocks after the text, Llama-3.2 writes the call as the reply).
QWEN_REPLIES = (('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
                 "<|im_end|>"), "It is 21 °C and clear in Paris.<|im_end|>",
                'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
                "2+3 = 5.<|im_end|>")
QWEN3_REPLIES = QWEN_REPLIES[:3] + ("<think>\n\n</think>\n\n2+3 = 5.<|im_end|>",)  # the final reply only
LLAMA_REPLIES = ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}<|eot_id|>',
                 "It is 21 °C and clear in Paris.<|eot_id|>", '{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>',
                 "2+3 = 5.<|eot_id|>")


@pytest.mark.parametrize("name,replies", [("qwen2_5", QWEN_REPLIES), ("qwen3", QWEN3_REPLIES),
                                          ("llama3_2", LLAMA_REPLIES)])
def test_tool_loss_mask_is_exactly_the_assistant_turns(loaded, name, replies):
    """Decoding each run of masked tokens gives the assistant turns, tool calls included, and nothing else: no
    tool schema, tool result, user or system text."""
    ours, _ = loaded(name)
    ids, mask = encode_chat(ours, TOOL_CONVERSATION, tools=TOOLS)
    runs, current = [], []
    for i, k in zip(ids, mask):
        if k:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert tuple(ours._tok.decode(r, skip_special_tokens=False) for r in runs) == replies


# Qwen3 keeps the reasoning of the replies after the last user query (and of the final one) and drops it from the
# earlier ones; reasoning comes as `reasoning_content` or inline in the content as <think>...</think>.
REASONING = [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "reasoning_content": "Add them.", "content": "5."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Use the tool.", "content": "",
     "tool_calls": [_call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": "21"},
    {"role": "assistant", "content": "<think>\nIt said 21.\n</think>\n\nIt is 21 °C."},
]


def test_qwen3_reasoning_matches_apply_chat_template(loaded):
    from rlhf_jax.tokenizer import render_template

    ours, ref = loaded("qwen3")
    text = render_template(ours.chat_format.template, REASONING, tools=TOOLS, eos_token=ours.eos_token)
    assert text == ref.apply_chat_template(REASONING, tools=TOOLS, tokenize=False)
    assert "Add them." not in text and "Use the tool." in text and "It said 21." in text
    ids, mask = encode_chat(ours, REASONING, tools=TOOLS)
    assert ids == _ids(ref.apply_chat_template(REASONING, tools=TOOLS, tokenize=True))
    lossy = ours._tok.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False)
    assert lossy == ("5.<|im_end|>"
                     '<think>\nUse the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
                     '{"city": "Paris"}}\n</tool_call><|im_end|>'
                     "<think>\nIt said 21.\n</think>\n\nIt is 21 °C.<|im_end|>")
    for k in (1, 3, 5):
        assert encode_prompt(ours, REASONING[:k], tools=TOOLS) == _ids(
            ref.apply_chat_template(REASONING[:k], tools=TOOLS, add_generation_prompt=True))


@pytest.mark.parametrize("name,prompt_end", [("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                              ("smollm3_sft", "<|im_start|>assistant\n<think>\n\n</think>\n")])
def test_enable_thinking_false_matches_apply_chat_template(loaded, name, prompt_end):
    """`enable_thinking=False` (a template variable) reaches the template through render_template's keywords."""
    from rlhf_jax.tokenizer import render_template

    ours, ref = loaded(name)
    messages = CONVERSATIONS[1][:-1]  # earlier replies, then the prompt of the last one
    text = render_template(ours.chat_format.template, messages, add_generation_prompt=True, enable_thinking=False,
                           eos_token=ours.eos_token)
    assert text.endswith(prompt_end)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)


def test_smollm3_tool_conversation_masks_match_transformers(loaded):
    """SmolLM3's SFT template writes the tool schemas into the system turn, a tool result as a user turn, and only an
    assistant's text (not its tool_calls); its generation blocks give transformers' assistant_masks."""
    ours, ref = loaded("smollm3_sft")
    ids, mask = encode_chat(ours, TOOL_CONVERSATION, tools=TOOLS)
    out = ref.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])


def test_plain_format_writes_tools_and_masks_calls():
    """The plain format (byte tokenizer): schemas after the system turn, results under <|tool|>, calls as Hermes
    blocks inside the loss."""
    from rlhf_jax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids, mask = encode_chat(tok, TOOL_CONVERSATION, tools=[ADD])
    text = tok.decode(ids)
    assert text.startswith("<|system|>\nYou check facts with tools.\n<|tools|>\n" + json.dumps(ADD) + "\n\n")
    assert "<|tool|>\n5\n" in text
    lossy = tok.decode([i for i, k in zip(ids, mask) if k])
    assert lossy == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
                     "It is 21 °C and clear in Paris."
                     'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>2+3 = 5.')
    assert sum(k for i, k in zip(ids, mask) if i == tok.eos_id) == 4
    prompt = encode_prompt(tok, TOOL_CONVERSATION[:2], tools=[ADD])
    assert ids[: len(prompt)] == prompt


def test_malformed_tool_call_is_refused():
    from rlhf_jax.tokenizer import ByteTokenizer

    with pytest.raises(ValueError, match="tool_calls\\[0\\]"):
        encode_chat(ByteTokenizer(), [{"role": "user", "content": "x"},
                                      {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}])
