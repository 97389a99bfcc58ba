"""Tokenizers and chat formatting: text and conversations to token ids and loss masks.

Two tokenizers share one small interface (`encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`pad_id`, `bos_id`, `eos_id`):

- `ByteTokenizer`: UTF-8 bytes 0..255 plus PAD=256, BOS=257, EOS=258. Needs no files; used by tests and the
  synthetic tasks.
- `HFTokenizer`: any Hugging Face `tokenizer.json` through the `tokenizers` library (GPT-2 BPE, Llama, Qwen ...).

Conversations (`[{"role": "system"|"user"|"assistant", "content": str}]`) are turned into ids with either the
default plain-text `ChatFormat` or a Jinja chat template (the `chat_template` of a `tokenizer_config.json`,
rendered in a sandbox as Hugging Face does). Loss is put on assistant turns only, their end-of-turn EOS included
(InstructGPT / Ouyang et al. 2022 SFT: the model is trained on demonstrations, not on the prompts).
Each message is tokenised as its own piece, so `encode_prompt(messages[:-1])` is always a prefix of
`encode_chat(messages)`: what the policy sees at rollout time is exactly what it was trained on.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ByteTokenizer", "HFTokenizer", "ChatFormat", "encode_chat", "encode_prompt", "render_template"]

_ROLES = ("system", "user", "assistant")


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, PAD=256, BOS=257, EOS=258 (vocab 259). No files."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    chat_format = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (BPE / Unigram / WordPiece) read with the `tokenizers` library.

    Special ids come from `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`) when it is given or sits
    beside `tokenizer.json`; otherwise from well-known special tokens in the vocabulary. Fallbacks:
    - eos: the first of <|endoftext|>, </s>, <|end_of_text|>, <eos>, <|im_end|>, <|eot_id|> present.
    - bos: <s>, <|begin_of_text|>, <bos>, <|startoftext|> if present, else eos (GPT-2: bos = eos = <|endoftext|>).
    - pad: a distinct pad token (<pad>, [PAD], <|pad|>, ...) when one exists, else eos. With pad == eos, padding
      is told apart from a real EOS by the masks (`segment_ids`, `prompt_mask`), never by the id.
    Tokens named in the config (special tokens, `additional_special_tokens`) that the vocabulary lacks are added
    as special tokens, as `transformers` does. `chat_format` holds the config's Jinja `chat_template`, if any.
    """

    def __init__(self, tokenizer: Any, config: dict | None = None):
        config = dict(config or {})
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
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_format = ChatFormat(template=template) if isinstance(template, str) else None

    @classmethod
    def from_file(cls, path: str | Path, *, config_path: str | Path | None = None) -> "HFTokenizer":
        """Loads `path` (a tokenizer.json or tokenizer.json.gz, or a folder holding tokenizer.json[.gz] and maybe
        tokenizer_config.json)."""
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
        config = json.loads(Path(config_path).read_text(encoding="utf-8")) if config_path else {}
        if file.suffix == ".gz":
            with gzip.open(file, "rt", encoding="utf-8") as f:
                return cls(Tokenizer.from_str(f.read()), config)
        return cls(Tokenizer.from_file(str(file)), config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text (e.g. <|im_start|>) become their ids. No BOS/EOS added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

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

    BOS and EOS are the tokenizer's ids (not text). Loss covers `{assistant}[EOS]`.
    With `template` set (a Jinja `chat_template`), the headers are unused: see `render_template`.
    """

    system_header: str = "<|system|>\n"
    """Text before the system message."""
    user_header: str = "<|user|>\n"
    """Text before each user message."""
    assistant_header: str = "<|assistant|>\n"
    """Text before each assistant message; `encode_prompt` ends with it."""
    turn_end: str = "\n"
    """Text after each system/user message (assistant turns end with the EOS id instead)."""
    add_bos: bool = True
    """Start the sequence with the tokenizer's BOS id."""
    template: str | None = None
    """A Hugging Face Jinja chat template; when set it replaces the plain-text format."""


def _check_messages(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r}")


def render_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                    bos_token: str = "", eos_token: str = "") -> str:
    """Renders a Jinja chat template as `transformers` does (sandboxed, trim_blocks, lstrip_blocks)."""
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=bos_token or "", eos_token=eos_token or "")


_COMPILED: dict[str, Any] = {}


def _compile(template: str):
    if template not in _COMPILED:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        _COMPILED[template] = env.from_string(template)
    return _COMPILED[template]


def _pieces(tokenizer, messages: Sequence[dict], fmt: ChatFormat, add_generation_prompt: bool):
    """Splits a conversation into (text | token id, is_loss) pieces, in order."""
    _check_messages(messages)
    if fmt.template is None:
        out: list[tuple[str | int, bool]] = [(tokenizer.bos_id, False)] if fmt.add_bos else []
        for m in messages:
            if m["role"] == "assistant":
                out += [(fmt.assistant_header, False), (m["content"], True), (tokenizer.eos_id, True)]
            else:
                header = fmt.system_header if m["role"] == "system" else fmt.user_header
                out += [(header + m["content"] + fmt.turn_end, False)]
        if add_generation_prompt:
            out.append((fmt.assistant_header, False))
        return out
    # Jinja: render growing prefixes; each message contributes the text its rendering adds.
    kw = dict(bos_token=getattr(tokenizer, "bos_token", "") or "", eos_token=getattr(tokenizer, "eos_token", "") or "")
    out, prev = [], ""
    steps = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            steps.append((messages[:i], True, False))
        steps.append((messages[: i + 1], False, m["role"] == "assistant"))
    if add_generation_prompt:
        steps.append((messages, True, False))
    for prefix, gen, is_loss in steps:
        text = render_template(fmt.template, prefix, add_generation_prompt=gen, **kw)
        if not text.startswith(prev):
            raise ValueError("chat template is not prefix-stable: rendering a longer conversation changed the "
                             f"text of a shorter one ({prev[-40:]!r} vs {text[:len(prev)][-40:]!r})")
        out.append((text[len(prev):], is_loss))
        prev = text
    return out


def _resolve(tokenizer, chat_format: ChatFormat | None) -> ChatFormat:
    if chat_format is not None:
        return chat_format
    return getattr(tokenizer, "chat_format", None) or ChatFormat()


def encode_chat(tokenizer, messages: Sequence[dict], chat_format: ChatFormat | None = None
                ) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (1 on assistant tokens and their EOS).

    `chat_format=None` uses the tokenizer's own chat template if it has one, else the default `ChatFormat()`.
    With a Jinja template, an assistant turn's loss covers the text its rendering adds, up to and including the
    first EOS id in it (e.g. ChatML's "<|im_end|>", not the newline after it).
    """
    ids: list[int] = []
    mask: list[int] = []
    for piece, is_loss in _pieces(tokenizer, messages, _resolve(tokenizer, chat_format), False):
        new = [piece] if isinstance(piece, int) else tokenizer.encode(piece)
        piece_mask = [int(is_loss)] * len(new)
        if is_loss and not isinstance(piece, int) and tokenizer.eos_id in new:
            cut = new.index(tokenizer.eos_id) + 1
            piece_mask = [1] * cut + [0] * (len(new) - cut)
        ids += new
        mask += piece_mask
    return ids, mask


def encode_prompt(tokenizer, messages: Sequence[dict], chat_format: ChatFormat | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant header: the prompt of a rollout."""
    ids: list[int] = []
    for piece, _ in _pieces(tokenizer, messages, _resolve(tokenizer, chat_format), True):
        ids += [piece] if isinstance(piece, int) else tokenizer.encode(piece)
    return ids
