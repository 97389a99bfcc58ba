"""Tokenizers and chat formatting: text and conversations to token ids and loss masks.

Two tokenizers share one small interface (`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`pad_id`, `bos_id`, `eos_id`):

- `ByteTokenizer`: UTF-8 bytes 0..255 plus PAD=256, BOS=257, EOS=258. Needs no files; used by tests and the
  synthetic tasks.
- `HFTokenizer`: any Hugging Face `tokenizer.json` through the `tokenizers` library (GPT-2 BPE, Llama, Qwen ...).

Conversations (`[{"role": "system"|"user"|"assistant"|"tool", "content": str}]`, assistant messages possibly
carrying `tool_calls`, see "Tools" below) are turned into ids with either the
default plain-text `ChatFormat` or a Jinja chat template (the `chat_template` of a `tokenizer_config.json` or a
`chat_template.jinja` file, rendered in a sandbox with the globals `transformers` provides). Loss is put on
assistant turns only, their end-of-turn token included (InstructGPT / Ouyang et al. 2022 SFT: the model is trained
on demonstrations, not on the prompts).

- Plain format: each message is tokenised as its own piece, so `encode_prompt(messages[:-1])` is always a prefix of
  `encode_chat(messages)`.
- Jinja template: exactly `transformers.apply_chat_template`: the whole conversation is rendered once and
  tokenised once; the loss mask comes from character offsets, of the template's `{% generation %}` blocks when it
  has them (as `return_assistant_tokens_mask`), else of the text each assistant message adds. Tokens that merge
  across a turn boundary (Qwen2.5: a reply starting with a newline) are therefore the tokens transformers gives,
  and the rollout prompt `encode_prompt(messages[:-1])` may differ from them in its last token, as it does there.

Tools (the layout of transformers and TRL): `tools` is a list of JSON schemas
`{"type": "function", "function": {"name", "description", "parameters"}}` given to the template as its `tools`
variable; an assistant message may carry `tool_calls` `[{"type": "function", "function": {"name", "arguments"}}]`
(its content may then be empty or absent) and a `{"role": "tool", "content": str}` message carries a result. The
template writes them as the model was trained to read them (Qwen2.5: `<tool_call>` blocks and `<tool_response>`
inside a user turn; Llama-3.2: a `{"name", "parameters"}` JSON reply and an `ipython` turn). The loss covers the
assistant's text and its tool calls, never the tool schemas or the results. Arguments are rendered as given: a
dict becomes a JSON object, a JSON string is quoted again by `tojson` (as transformers does), so records give
arguments as dicts (`rlhf_jax.data.records` turns JSON strings into dicts).
"""
from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ByteTokenizer", "HFTokenizer", "ChatFormat", "encode_chat", "encode_chat_split", "encode_prompt",
           "render_template"]

_ROLES = ("system", "user", "assistant", "tool")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, PAD=256, BOS=257, EOS=258 (vocab 259). No files."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    chat_format = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each, the (start, end) character span of `text` it came from."""
        ids, offsets = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids += list(b)
            offsets += [(i, i + 1)] * len(b)
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; PAD/BOS/EOS are skipped, invalid UTF-8 is replaced (U+FFFD)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>")


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _as_transformers_llama(tokenizer: Any, config: dict) -> None:
    """transformers >= 5 does not run a Llama-class tokenizer.json's own normalizer: `LlamaTokenizer` rebuilds it
    from the vocabulary and merges with no normalizer and a Metaspace pre-tokenizer that prepends "▁" to the first
    piece only (to every piece between special tokens with `"legacy": true`; never with `add_prefix_space: false`).
    Llama-2, TinyLlama, Mistral and Zephyr folders name this class; we rebuild the same way, so that their ids are
    transformers' ids (the file's own `Prepend("▁")` normalizer would put "▁" after every special token)."""
    from tokenizers import decoders, pre_tokenizers

    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else []))


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (BPE / Unigram / WordPiece) read with the `tokenizers` library.

    Special ids come from `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`) when it is given or sits
    beside `tokenizer.json`; otherwise from well-known special tokens in the vocabulary. Fallbacks:
    - eos: the first of <|endoftext|>, </s>, <|end_of_text|>, <eos>, <|im_end|>, <|eot_id|> present.
    - bos: <s>, <|begin_of_text|>, <bos>, <|startoftext|> if present, else eos (GPT-2: bos = eos = <|endoftext|>).
    - pad: a distinct pad token (<pad>, [PAD], <|pad|>, ...) when one exists, else eos. With pad == eos, padding
      is told apart from a real EOS by the masks (`segment_ids`, `prompt_mask`), never by the id.
    Tokens named in the config (special tokens, `additional_special_tokens`) that the vocabulary lacks are added
    as special tokens, as `transformers` does; a config naming `LlamaTokenizer` gets transformers' Llama
    pre-tokenizer (see `_as_transformers_llama`). `chat_format` holds the config's Jinja `chat_template`, if any.
    """

    def __init__(self, tokenizer: Any, config: dict | None = None):
        config = dict(config or {})
        if config.get("tokenizer_class") in _LLAMA_CLASSES:
            _as_transformers_llama(tokenizer, config)
        self._tok = tokenizer
        names = [_token_str(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")]
        names += [_token_str(t) for t in config.get("additional_special_tokens") or []]
        missing = [n for n in names if n and tokenizer.token_to_id(n) is None]
        if missing:
            from tokenizers import AddedToken

            tokenizer.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in dict.fromkeys(missing)])

        def find(key, candidates):
            name = _token_str(config.get(key))
            if name is not None:
                return tokenizer.token_to_id(name)
            return next((tokenizer.token_to_id(c) for c in candidates if tokenizer.token_to_id(c) is not None), None)

        self.eos_id = find("eos_token", _EOS_CANDIDATES)
        if self.eos_id is None:
            raise ValueError("HFTokenizer: no EOS token found; set `eos_token` in tokenizer_config.json")
        bos = find("bos_token", _BOS_CANDIDATES)
        self.bos_id = self.eos_id if bos is None else bos
        pad = find("pad_token", _PAD_CANDIDATES)
        self.pad_id = self.eos_id if pad is None else pad
        self.bos_token = tokenizer.id_to_token(self.bos_id) if bos is not None or "bos_token" not in config else None
        self.eos_token = tokenizer.id_to_token(self.eos_id)
        self.pad_token = _token_str(config.get("pad_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_format = ChatFormat(template=template) if isinstance(template, str) else None

    @classmethod
    def from_file(cls, path: str | Path, *, config_path: str | Path | None = None) -> "HFTokenizer":
        """Loads `path` (a tokenizer.json or tokenizer.json.gz, or a folder holding tokenizer.json[.gz] and maybe
        tokenizer_config.json and chat_template.jinja)."""
        from tokenizers import Tokenizer

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if path.is_dir() and not file.is_file() and (path / "tokenizer.json.gz").is_file():
            file = path / "tokenizer.json.gz"
        if not file.is_file():
            raise FileNotFoundError(f"HFTokenizer.from_file: no tokenizer.json at {file}")
        if config_path is None and (folder / "tokenizer_config.json").is_file():
            config_path = folder / "tokenizer_config.json"
        config = _read_config(Path(config_path)) if config_path else {}
        jinja = Path(config_path).parent / "chat_template.jinja" if config_path else folder / "chat_template.jinja"
        if jinja.is_file():  # where transformers >= 4.47 writes the template (it wins over the config's)
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        try:
            if file.suffix == ".gz":
                with gzip.open(file, "rt", encoding="utf-8") as f:
                    tok = Tokenizer.from_str(f.read())
            else:
                tok = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001  (the tokenizers library raises a bare Exception)
            raise ValueError(f"{file}: not a tokenizer.json that the `tokenizers` library can read ({e}); pass a "
                             "Hugging Face tokenizer.json or the folder holding one") from None
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text (e.g. <|im_start|>) become their ids. No BOS/EOS added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (as `encode`) and, for each, its (start, end) character span in `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), list(enc.offsets)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping PAD/BOS/EOS (other special tokens are kept)."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChatFormat:
    """How a conversation becomes text. The default is plain text, so it works with the byte tokenizer:

        [BOS]<|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{assistant}[EOS]<|user|>\\n...

    BOS and EOS are the tokenizer's ids (not text). Loss covers `{assistant}[EOS]`. With tools, their schemas
    follow the system message (`<|tools|>\n{schema}\n...`), a tool result is `<|tool|>\n{result}\n` and an
    assistant's tool calls follow its text as Hermes blocks `<tool_call>\n{"name": ..., "arguments": ...}\n
    </tool_call>` (one per call, newline-separated, as Qwen2.5 writes them), inside the loss.
    With `template` set (a Jinja `chat_template`), the headers are unused: see `render_template`.
    """

    system_header: str = "<|system|>\n"
    """Text before the system message."""
    user_header: str = "<|user|>\n"
    """Text before each user message."""
    assistant_header: str = "<|assistant|>\n"
    """Text before each assistant message; `encode_prompt` ends with it."""
    tool_header: str = "<|tool|>\n"
    """Text before each tool result."""
    tools_header: str = "<|tools|>\n"
    """Text before the tool schemas (one JSON object a line), written after the system message when tools are
    given."""
    turn_end: str = "\n"
    """Text after each system/user/tool message and the tool schemas (assistant turns end with the EOS id
    instead)."""
    add_bos: bool = True
    """Start the sequence with the tokenizer's BOS id."""
    template: str | None = None
    """A Hugging Face Jinja chat template; when set it replaces the plain-text format."""


def _check_messages(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> None:
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or (
            calls and m.get("role") == "assistant" and m.get("content") is None))
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not content_ok:
            raise ValueError(f"message {i} must be {{'role': one of {_ROLES}, 'content': str}} (an assistant message "
                             f"with tool_calls may have no content), got {m!r}")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, (list, tuple)):
                raise ValueError(f"message {i}: tool_calls must be a list on an assistant message, got {m!r}")
            for k, call in enumerate(calls):
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]
                        and isinstance(fn.get("arguments"), (dict, str))):
                    raise ValueError(f"message {i}: tool_calls[{k}] must be {{'type': 'function', 'function': "
                                     f"{{'name': str, 'arguments': dict or JSON string}}}}, got {call!r}")
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"tools must be a list of JSON schemas (dicts), got {tools!r}")


def _call_function(call: dict) -> dict:
    """{"name", "arguments"} of a tool call given as {"type": "function", "function": {...}} or flat."""
    return call["function"] if isinstance(call.get("function"), dict) else call


def render_template(template: str, messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = False, bos_token: str = "", eos_token: str = "",
                    **extra: Any) -> str:
    """Renders a Jinja chat template as `transformers.apply_chat_template(messages, tools=tools, tokenize=False)`
    does (sandboxed, trim_blocks, lstrip_blocks, with its globals `raise_exception` and `strftime_now` and its
    `tojson`; message keys whose value is None are dropped; `tools` and `documents=None` are always passed).
    `tools` are JSON schemas; `{% generation %}` markers render as nothing."""
    text, _ = _render(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                      bos_token=bos_token, eos_token=eos_token, **extra)
    return text


# Private-use code points that bracket {% generation %} output while rendering; removed before tokenising.
_GEN_OPEN, _GEN_CLOSE = "\U000F0001", "\U000F0002"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_COMPILED: dict[str, Any] = {}


def _compile(template: str):
    if template not in _COMPILED:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationBlocks(Extension):
            """`{% generation %}...{% endgeneration %}`: the body, bracketed by two sentinel characters."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

            def _bracket(self, caller):
                return _GEN_OPEN + caller() + _GEN_CLOSE

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationBlocks, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _COMPILED[template] = env.from_string(template)
    return _COMPILED[template]


def _render(template: str, messages: Sequence[dict], *, tools: Sequence[dict] | None = None,
            **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its `{% generation %}` blocks."""
    for i, m in enumerate(messages):
        text = m.get("content")
        if isinstance(text, str) and (_GEN_OPEN in text or _GEN_CLOSE in text):
            raise ValueError(f"message {i} contains a reserved private-use character (U+F0001 or U+F0002)")
    # As transformers: keys holding None are dropped (templates test `'tool_calls' in message`), tools and
    # documents are always defined.
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    tools = None if tools is None else [dict(t) for t in tools]
    marked = _compile(template).render(messages=plain, tools=tools, documents=None, **kwargs)
    text, spans, pos = [], [], 0
    for part in re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", marked):
        if part == _GEN_OPEN:
            spans.append([pos, None])
        elif part == _GEN_CLOSE:
            spans[-1][1] = pos
        else:
            text.append(part)
            pos += len(part)
    return "".join(text), [(a, b) for a, b in spans if b is not None and b > a]


def _template_kwargs(tokenizer) -> dict:
    """What transformers passes a template besides the messages: its special tokens' text."""
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {k: getattr(tokenizer, k, None) or "" for k in names}


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _assistant_spans(template: str, messages: Sequence[dict], text: str, kw: dict) -> list[tuple[int, int]]:
    """Character spans of each assistant message in `text` (the whole conversation rendered), for a template
    without generation markers: from the end of the prompt rendered with the generation prompt to where the
    conversation rendered up to this reply stops agreeing with the whole.

    A template may render the last reply differently from one that later messages follow (Qwen3 gives a `<think>`
    block only to replies after the last user query, and always to the final one). When the conversation rendered
    up to a reply stops agreeing with the whole before the reply's first EOS text (e.g. "<|im_end|>"), the reply
    is read from the conversation rendered up to the next message, where it is no longer last, and ends with its
    first EOS text."""
    spans = []
    eos = kw.get("eos_token") or ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, _ = _render(template, messages[:i], add_generation_prompt=True, **kw)
        upto, _ = _render(template, messages[: i + 1], add_generation_prompt=False, **kw)
        end = _common_prefix(upto, text)
        if eos and i + 1 < len(messages) and text.startswith(head) and end < upto.find(eos, len(head)):
            after, _ = _render(template, messages[: i + 2], add_generation_prompt=False, **kw)
            stop = text.find(eos, len(head), _common_prefix(after, text))
            end = stop + len(eos) if stop >= 0 else len(head)
        if not text.startswith(head) or end <= len(head):
            raise ValueError(
                f"chat template: cannot find assistant message {i} in the rendered conversation (the template renders "
                "earlier turns differently once later ones follow); use a template with {% generation %} markers "
                "around assistant replies")
        spans.append((len(head), end))
    return spans


def _encode_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise TypeError(f"{type(tokenizer).__name__} has no encode_with_offsets(text), which a Jinja chat template "
                        "needs (to find the assistant tokens)")
    ids, offsets = tokenizer.encode_with_offsets(text)
    return list(ids), [tuple(o) for o in offsets]


def _encode_template(tokenizer, messages: Sequence[dict], template: str, tools: Sequence[dict] | None = None
                     ) -> tuple[list[int], list[int], int]:
    """(ids, loss mask, index of the last assistant turn's first token) of a whole conversation rendered once."""
    kw = {**_template_kwargs(tokenizer), "tools": tools}
    text, spans = _render(template, messages, add_generation_prompt=False, **kw)
    marked = bool(_GENERATION_TAG.search(template))
    if not marked:
        spans = _assistant_spans(template, messages, text, kw)
    ids, offsets = _encode_offsets(tokenizer, text)
    mask = [0] * len(ids)
    first = len(ids)
    for k, (a, b) in enumerate(spans):
        inside = [t for t, (s, e) in enumerate(offsets) if s < b and e > a]
        if not marked and tokenizer.eos_id in [ids[t] for t in inside]:  # stop after the reply's first EOS
            inside = inside[: [ids[t] for t in inside].index(tokenizer.eos_id) + 1]
        for t in inside:
            mask[t] = 1
        if inside and k == len(spans) - 1 and messages and messages[-1]["role"] == "assistant":
            first = inside[0]
    return ids, mask, first


def _plain_reply(m: dict) -> str:
    """An assistant message in the plain format: its text, then a Hermes block per tool call."""
    text = m.get("content") or ""
    for call in m.get("tool_calls") or ():
        fn = _call_function(call)
        block = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
        text += ("\n" if text else "") + "<tool_call>\n" + block + "\n</tool_call>"
    return text


def _pieces(tokenizer, messages: Sequence[dict], fmt: ChatFormat, add_generation_prompt: bool,
            tools: Sequence[dict] | None = None):
    """The plain format's (text | token id, is_loss) pieces, in order."""
    out: list[tuple[str | int, bool]] = [(tokenizer.bos_id, False)] if fmt.add_bos else []
    schemas = (fmt.tools_header + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + fmt.turn_end
               if tools else None)
    if schemas and not (messages and messages[0]["role"] == "system"):
        out.append((schemas, False))
    for m in messages:
        if m["role"] == "assistant":
            out += [(fmt.assistant_header, False), (_plain_reply(m), True), (tokenizer.eos_id, True)]
        else:
            header = {"system": fmt.system_header, "tool": fmt.tool_header}.get(m["role"], fmt.user_header)
            out += [(header + m["content"] + fmt.turn_end, False)]
            if schemas and m is messages[0] and m["role"] == "system":
                out.append((schemas, False))
    if add_generation_prompt:
        out.append((fmt.assistant_header, False))
    return out


def _resolve(tokenizer, chat_format: ChatFormat | None) -> ChatFormat:
    if chat_format is not None:
        return chat_format
    return getattr(tokenizer, "chat_format", None) or ChatFormat()


def encode_chat(tokenizer, messages: Sequence[dict], chat_format: ChatFormat | None = None, *,
                tools: Sequence[dict] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (1 on assistant tokens and their end of turn).

    `chat_format=None` uses the tokenizer's own chat template if it has one, else the default `ChatFormat()`.
    With a Jinja template the ids are `apply_chat_template(messages)`'s; the loss covers the template's
    `{% generation %}` blocks when it has them (transformers' `assistant_masks`), else every token overlapping the
    text an assistant message adds, up to and including its first EOS id (e.g. ChatML's "<|im_end|>", not the
    newline after it). That text includes the message's tool calls as the template writes them; tool results,
    user and system turns and the tool schemas (`tools`, JSON schemas passed to the template) get no loss.
    """
    ids, mask, _ = encode_chat_split(tokenizer, messages, chat_format, tools=tools)
    return ids, mask


def encode_chat_split(tokenizer, messages: Sequence[dict], chat_format: ChatFormat | None = None, *,
                      tools: Sequence[dict] | None = None) -> tuple[list[int], list[int], int]:
    """`encode_chat` plus the index of the first token of the last assistant turn (len(ids) if none): where the
    final reply starts, for preference pairs and truncation."""
    _check_messages(messages, tools)
    fmt = _resolve(tokenizer, chat_format)
    if fmt.template is not None:
        return _encode_template(tokenizer, messages, fmt.template, tools)
    ids: list[int] = []
    mask: list[int] = []
    first, prev = len(ids), False
    for piece, is_loss in _pieces(tokenizer, messages, fmt, False, tools):
        if is_loss and not prev:
            first = len(ids)
        prev = is_loss
        new = [piece] if isinstance(piece, int) else tokenizer.encode(piece)
        ids += new
        mask += [int(is_loss)] * len(new)
    last_is_reply = bool(messages) and messages[-1]["role"] == "assistant"
    return ids, mask, first if last_is_reply else len(ids)


def encode_prompt(tokenizer, messages: Sequence[dict], chat_format: ChatFormat | None = None, *,
                  tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant header: the prompt of a rollout (with a Jinja
    template, `apply_chat_template(messages, tools=tools, add_generation_prompt=True)`)."""
    _check_messages(messages, tools)
    fmt = _resolve(tokenizer, chat_format)
    if fmt.template is not None:
        text, _ = _render(fmt.template, messages, tools=tools, add_generation_prompt=True,
                          **_template_kwargs(tokenizer))
        return _encode_offsets(tokenizer, text)[0]
    ids: list[int] = []
    for piece, _ in _pieces(tokenizer, messages, fmt, True, tools):
        ids += [piece] if isinstance(piece, int) else tokenizer.encode(piece)
    return ids
