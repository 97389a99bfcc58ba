"""Typed records parsed from local JSON / JSONL / JSONL.gz files, with errors that say where.

Record kinds (`load_records(path, kind)`):
- "sft"        -> `SFTRecord(messages)`: Alpaca {instruction, input?, output, system?}, FLAN/T0 {prompt, completion}
                  (a trailing "<|endoftext|>" in the completion is removed), {prompt, response}, {question, answer}, chat
                  {messages: [{role, content}]}, ShareGPT {conversations: [{from, value}]}, or TRL's conversational
                  prompt-completion {prompt: [messages], completion: [assistant messages]}. Ends with an assistant
                  turn. Anywhere, a message's content may be a list of typed text parts [{type: "text", text}].
                  Tool use (TRL's / transformers' layout): a `tools` column of JSON schemas, assistant messages with
                  `tool_calls` [{type: "function", function: {name, arguments}}] (content then optional) and
                  {role: "tool", content} results; see "Tool calls" below.
- "oasst"      -> `SFTRecord`: an OpenAssistant message tree, following the top-ranked reply (rank 0) at each
                  level (Köpf et al. 2023, OpenAssistant Conversations); a trailing user turn is dropped.
- "preference" -> `PreferenceRecord(prompt, chosen, rejected)`: {prompt, chosen, rejected} (prompt a string or a
                  message list, responses strings or {role|from, content|value} dicts), LLaMA-Factory DPO
                  {conversations, chosen, rejected}, TRL's implicit-prompt layout {chosen: [messages], rejected:
                  [messages]} (whole conversations sharing all but the last reply), or Anthropic HH-RLHF transcripts
                  {chosen, rejected}
                  ("\\n\\nHuman: ...\\n\\nAssistant: ...", Bai et al. 2022) whose prompt is the longest common prefix
                  ending with "\\n\\nAssistant:".
- "unpaired"   -> `UnpairedRecord(prompt, completion, label)`: binary feedback on one reply (KTO, Ethayarajh et al.
                  2024): {prompt, completion, label: true|false}, the prompt a string or a message list and the
                  completion a string or a one-message assistant list (TRL's conversational form). `unpair`
                  turns preference pairs into such records (chosen -> true, rejected -> false).
- "prompt"     -> `PromptRecord(messages, meta)`: a JSON string, or {prompt | question | instruction(+input) |
                  messages} with the other fields kept in `meta` (e.g. a GSM8K reference answer).
- "text"       -> `TextRecord(text)`: {text} or a JSON string (pre-training text for mixtures).

Tool calls: each call is stored as {"type": "function", "function": {"name": str, "arguments": dict}}; a flat
{name, arguments} call is accepted, absent arguments are {}, and arguments given as a JSON string (the OpenAI
layout) are decoded, so that
templates render them as a JSON object. A call without a name or whose arguments are not an object is a
`DataError` naming the field (e.g. `messages[2].tool_calls[0].function.arguments`). A tool message keeps its
optional `name` and `tool_call_id`; `tools` may also be a JSON string of the list (as some Hub datasets store it).

Bad input raises `DataError` naming file, line and field. With `skip_invalid=True` bad records are skipped and
counted in `records.summary` (also logged); nothing is ever dropped silently.
"""
from __future__ import annotations

import dataclasses
import csv
import gzip
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

__all__ = ["DataError", "SFTRecord", "PreferenceRecord", "UnpairedRecord", "PromptRecord", "TextRecord", "Records",
           "KINDS", "parse_record", "load_records", "parse_hh_transcript", "unpair"]

KINDS = ("sft", "oasst", "preference", "unpaired", "prompt", "text")
_log = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad record or file: `path`, `line` (1-based line of a JSONL file, or item number of a JSON list) and
    `field` say where."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.reason, self.path, self.line, self.field = message, path, line, field
        where = f"{path or '<record>'}" + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: " + (f"field {field!r}: " if field else "") + message)

    def at(self, path: str, line: int | None) -> "DataError":
        return DataError(self.reason, path=path, line=line, field=self.field)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTRecord:
    """A conversation for supervised fine-tuning; it ends with an assistant turn."""

    messages: tuple[dict, ...]
    """[{"role": "system"|"user"|"assistant"|"tool", "content": str}], the last one from the assistant; assistant
    messages may carry "tool_calls" (see the module docstring)."""
    tools: tuple[dict, ...] | None = None
    """JSON schemas of the tools the conversation may call, given to the chat template; None: no tools."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceRecord:
    """A pairwise human preference: two assistant replies to the same conversation."""

    prompt: tuple[dict, ...]
    """The shared conversation, ending with a user turn."""
    chosen: str
    """The preferred assistant reply."""
    rejected: str
    """The other reply."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnpairedRecord:
    """Binary feedback on one assistant reply (KTO's data): was it desirable?"""

    prompt: tuple[dict, ...]
    """The conversation, ending with a user turn."""
    completion: str
    """The assistant reply that was judged."""
    label: bool
    """True: desirable; False: undesirable."""


def unpair(pairs) -> list[UnpairedRecord]:
    """Preference pairs -> unpaired feedback: each pair gives its chosen reply labelled True and its rejected reply
    labelled False, in that order (TRL's `unpair_preference_dataset`)."""
    out = []
    for p in pairs:
        out.append(UnpairedRecord(prompt=p.prompt, completion=p.chosen, label=True))
        out.append(UnpairedRecord(prompt=p.prompt, completion=p.rejected, label=False))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """A prompt for rollouts (PPO) or evaluation; `meta` keeps the record's other fields (e.g. a reference)."""

    messages: tuple[dict, ...]
    """The conversation so far, ending with a user turn."""
    meta: dict = dataclasses.field(default_factory=dict)
    """Other fields of the source record, untouched."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextRecord:
    """Plain text (pre-training style: loss on every token)."""

    text: str
    """The document."""


# ----------------------------------------------------------------------------------------------- field helpers
def _get(obj: dict, field: str, *, required: bool = True, empty_ok: bool = False) -> str | None:
    if field not in obj or obj[field] is None:
        if required:
            raise DataError("missing", field=field)
        return None
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    if not empty_ok and not value.strip():
        raise DataError("empty", field=field)
    return value


_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "prompter": "user",
                 "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                 "tool": "tool"}


def _message(m: Any, field: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"expected a message object, got {type(m).__name__}", field=field)
    role_key = "role" if "role" in m else "from"
    text_key = "value" if "value" in m and "content" not in m else "content"
    role = m.get(role_key)
    if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
        raise DataError(f"unknown role {role!r} (expected one of {sorted(_ROLE_ALIASES)})", field=f"{field}.{role_key}")
    role = _ROLE_ALIASES[role.lower()]
    calls = m.get("tool_calls")
    if calls is not None and role != "assistant":
        raise DataError(f"only assistant messages carry tool calls, this one is from {role!r}",
                        field=f"{field}.tool_calls")
    calls = None if calls is None else _tool_calls(calls, f"{field}.tool_calls")
    content = m.get(text_key)
    if content is None and calls is not None:   # a message that only calls tools (content null or absent)
        content = ""
    if isinstance(content, list):   # typed parts, [{"type": "text", "text": ...}] (OpenAI / TRL layout)
        content = _text_parts(content, f"{field}.{text_key}")
    if not isinstance(content, str):
        raise DataError(f"expected a string, got {type(content).__name__}", field=f"{field}.{text_key}")
    if role == "assistant" and not content.strip() and not calls:
        raise DataError("empty assistant message", field=f"{field}.{text_key}")
    out = {"role": role, "content": content}
    if calls is not None:
        out["tool_calls"] = calls
    if role == "tool":
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise DataError(f"expected a string, got {type(m[key]).__name__}", field=f"{field}.{key}")
                out[key] = m[key]
    return out


def _tool_calls(calls: Any, field: str) -> list[dict]:
    """An assistant message's tool calls, each as {"type": "function", "function": {"name", "arguments": dict}}."""
    if not isinstance(calls, list) or not calls:
        raise DataError("expected a non-empty list of tool calls", field=field)
    out = []
    for i, call in enumerate(calls):
        where = f"{field}[{i}]"
        if not isinstance(call, dict):
            raise DataError(f"expected a tool call object, got {type(call).__name__}", field=where)
        if "function" in call:
            fn, where = call["function"], f"{where}.function"
            if not isinstance(fn, dict):
                raise DataError(f"expected an object {{name, arguments}}, got {type(fn).__name__}", field=where)
        else:
            fn = call
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError("missing tool name (a non-empty string)", field=f"{where}.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(f"arguments string is not JSON ({e.msg})", field=f"{where}.arguments") from None
        if not isinstance(args, dict):
            raise DataError(f"arguments must be a JSON object, got {type(args).__name__}", field=f"{where}.arguments")
        out.append({"type": "function", "function": {"name": name, "arguments": args}})
    return out


def _tools(value: Any) -> tuple[dict, ...] | None:
    """The `tools` column: JSON schemas (a list, or a JSON string of one); null or [] is no tools."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"a string that is not JSON ({e.msg})", field="tools") from None
        if value is None:
            return None
    if not isinstance(value, list):
        raise DataError(f"expected a list of tool schemas, got {type(value).__name__}", field="tools")
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise DataError('expected a JSON schema {"type": "function", "function": {"name", "description", '
                            '"parameters"}}', field=f"tools[{i}]")
    return tuple(value) or None


def _text_parts(parts: list, field: str) -> str:
    """A message content given as typed parts: the text parts concatenated; any other part type is refused (the
    models here read text only)."""
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(f"only text parts ({{\"type\": \"text\", \"text\": ...}}) are read, got {kind!r}",
                            field=f"{field}[{i}]")
        texts.append(part["text"])
    return "".join(texts)


def _messages(value: Any, field: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise DataError("expected a non-empty list of messages", field=field)
    return tuple(_message(m, f"{field}[{i}]") for i, m in enumerate(value))


def _user_prompt(obj: dict) -> tuple[dict, ...]:
    """The prompt of a prompt/response style record, as messages (an optional system turn, then the user)."""
    if "instruction" in obj:
        text = _get(obj, "instruction")
        extra = _get(obj, "input", required=False, empty_ok=True)
        text = text + ("\n\n" + extra if extra and extra.strip() else "")
    elif "question" in obj:
        text = _get(obj, "question")
    else:
        text = _get(obj, "prompt")
    system = _get(obj, "system", required=False, empty_ok=True)
    return (({"role": "system", "content": system},) if system and system.strip() else ()) + (
        {"role": "user", "content": text},)


# ------------------------------------------------------------------------------------------------ kind parsers
def _parse_sft(obj: Any) -> SFTRecord:
    _need_dict(obj)
    tools = _tools(obj.get("tools"))
    for key in ("messages", "conversations"):
        if key in obj:
            msgs = _messages(obj[key], key)
            if msgs[-1]["role"] != "assistant":
                raise DataError("the last message must be from the assistant", field=f"{key}[{len(msgs) - 1}]")
            return SFTRecord(messages=msgs, tools=tools)
    if "instruction" in obj:
        response = _get(obj, "output")
    elif "question" in obj:
        response = _get(obj, "answer")
    elif "prompt" in obj and isinstance(obj["prompt"], list):   # TRL's conversational prompt-completion
        prompt = _messages(obj["prompt"], "prompt")
        if prompt[-1]["role"] not in ("user", "tool"):
            raise DataError("the prompt must end with a user message (or a tool result)",
                            field=f"prompt[{len(prompt) - 1}]")
        if "completion" not in obj:
            raise DataError("missing", field="completion")
        value = obj["completion"]
        completion = (_messages(value, "completion") if isinstance(value, list)
                      else ({"role": "assistant", "content": _response(value, "completion")},))
        if any(m["role"] not in ("assistant", "tool") for m in completion):
            raise DataError("expected assistant messages only (and tool results between them)", field="completion")
        if completion[-1]["role"] != "assistant":
            raise DataError("the last message must be from the assistant", field="completion")
        return SFTRecord(messages=prompt + completion, tools=tools)
    elif "prompt" in obj:
        key = "completion" if "completion" in obj or "response" not in obj else "response"
        response = _get(obj, key)
        response = response[: -len("<|endoftext|>")] if response.endswith("<|endoftext|>") else response
        if not response.strip():
            raise DataError("empty", field=key)
    else:
        raise DataError("missing (expected messages, conversations, instruction/output or prompt/completion; a "
                        "{text} record is plain text: pass --data.kind text to train on every token)",
                        field="instruction")
    return SFTRecord(messages=_user_prompt(obj) + ({"role": "assistant", "content": response},))


def _parse_oasst(obj: Any) -> SFTRecord:
    _need_dict(obj)
    node, field, path = obj.get("prompt"), "prompt", []
    while node is not None:
        if not isinstance(node, dict):
            raise DataError(f"expected a message object, got {type(node).__name__}", field=field)
        path.append(_message({"role": node.get("role"), "content": node.get("text")}, field))
        replies = node.get("replies", [])
        if not isinstance(replies, list):
            raise DataError("expected a list", field=f"{field}.replies")
        live = [(i, r) for i, r in enumerate(replies) if isinstance(r, dict) and not r.get("deleted", False)]
        if any(not isinstance(r, dict) for r in replies):
            raise DataError("expected message objects", field=f"{field}.replies")
        for i, r in live:
            if r.get("rank") is not None and (not isinstance(r["rank"], int) or isinstance(r["rank"], bool)):
                raise DataError(f"expected an integer rank, got {r['rank']!r}", field=f"{field}.replies[{i}].rank")
        if not live:
            break
        i, node = min(live, key=lambda ir: (ir[1].get("rank") is None, ir[1].get("rank") or 0, ir[0]))
        field = f"{field}.replies[{i}]"
    while path and path[-1]["role"] != "assistant":
        path.pop()
    if not path:
        raise DataError("tree has no assistant reply", field="prompt.replies")
    return SFTRecord(messages=tuple(path))


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, field: str = "transcript") -> tuple[dict, ...]:
    """Splits an HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages (content stripped)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError('expected a transcript "\\n\\nHuman: ...\\n\\nAssistant: ..."', field=field)
    return tuple({"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                 for who, body in zip(parts[1::2], parts[2::2]))


def _response(value: Any, field: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        m = _message(value, field)
        if m["role"] != "assistant":
            raise DataError("expected an assistant message", field=field)
        return m["content"]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    if not value.strip():
        raise DataError("empty response", field=field)
    return value


def _conversation_pair(obj: dict) -> PreferenceRecord | None:
    """Chosen and rejected given as whole conversations (UltraFeedback-binarized, TRL's implicit-prompt layout):
    message lists that share every message but the last, an assistant reply. None when they are not such lists."""
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list) and (len(chosen) > 1 or len(rejected) > 1)):
        return None
    c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for key, conv in (("chosen", c), ("rejected", r)):
        if conv[-1]["role"] != "assistant":
            raise DataError("the conversation must end with the assistant's reply", field=key)
    if c[:-1] != r[:-1]:
        raise DataError("chosen and rejected conversations differ before their last message", field="rejected")
    prompt = c[:-1]
    if not prompt:          # TRL's explicit-prompt form with one-message replies: the prompt field holds it
        prompt = _messages(obj["prompt"], "prompt") if isinstance(obj.get("prompt"), list) else _user_prompt(obj)
    if prompt[-1]["role"] != "user":
        raise DataError("the prompt must end with a user message", field="chosen")
    return PreferenceRecord(prompt=prompt, chosen=c[-1]["content"], rejected=r[-1]["content"])


def _implicit_pair(obj: dict) -> PreferenceRecord:
    """TRL's implicit-prompt preference layout (trl-lib/ultrafeedback_binarized, hh-rlhf-helpful-base): `chosen` and
    `rejected` are whole conversations sharing every message before the last, the assistant's reply."""
    pair = _conversation_pair(obj)
    if pair is None:
        raise DataError("expected two conversations (the shared prompt, then one assistant reply each)",
                        field="chosen")
    return pair


def _parse_preference(obj: Any) -> PreferenceRecord:
    _need_dict(obj)
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise DataError("missing", field=key)
    has_prompt = any(k in obj for k in ("prompt", "conversations", "messages", "instruction", "question"))
    if not has_prompt and isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list):
        return _implicit_pair(obj)   # TRL's implicit-prompt layout: two whole conversations
    if not has_prompt:  # Anthropic HH-RLHF: two full transcripts sharing the prompt
        chosen, rejected = _get(obj, "chosen"), _get(obj, "rejected")
        n, limit = 0, min(len(chosen), len(rejected))
        while n < limit and chosen[n] == rejected[n]:
            n += 1
        cut = chosen.rfind("\n\nAssistant:", 0, n)
        if cut < 0:
            raise DataError('chosen and rejected share no prefix ending with "\\n\\nAssistant:"', field="chosen")
        prompt = parse_hh_transcript(chosen[:cut], "chosen")
        end = cut + len("\n\nAssistant:")
        return PreferenceRecord(prompt=prompt, chosen=_response(chosen[end:].strip(), "chosen"),
                                rejected=_response(rejected[end:].strip(), "rejected"))
    conversations = _conversation_pair(obj)
    if conversations is not None:
        return conversations
    if "prompt" in obj and isinstance(obj["prompt"], list):
        prompt = _messages(obj["prompt"], "prompt")
    elif "conversations" in obj or "messages" in obj:
        key = "conversations" if "conversations" in obj else "messages"
        prompt = _messages(obj[key], key)
    else:
        prompt = _user_prompt(obj)
    if prompt[-1]["role"] != "user":
        raise DataError("the prompt must end with a user message", field="prompt")
    return PreferenceRecord(prompt=prompt, chosen=_response(obj["chosen"], "chosen"),
                            rejected=_response(obj["rejected"], "rejected"))


def _parse_unpaired(obj: Any) -> UnpairedRecord:
    _need_dict(obj)
    for key in ("prompt", "completion", "label"):
        if key not in obj:
            raise DataError("missing", field=key)
    prompt = _messages(obj["prompt"], "prompt") if isinstance(obj["prompt"], list) else _user_prompt(obj)
    if prompt[-1]["role"] != "user":
        raise DataError("the prompt must end with a user message", field="prompt")
    label = obj["label"]
    if not isinstance(label, bool):
        raise DataError(f"expected true or false, got {json.dumps(label)}", field="label")
    return UnpairedRecord(prompt=prompt, completion=_response(obj["completion"], "completion"), label=label)


def _parse_prompt(obj: Any) -> PromptRecord:
    if isinstance(obj, str):
        if not obj.strip():
            raise DataError("empty prompt", field="prompt")
        return PromptRecord(messages=({"role": "user", "content": obj},))
    _need_dict(obj)
    key = next((k for k in ("messages", "conversations") if k in obj), None)
    if key is not None or isinstance(obj.get("prompt"), list):
        key = key or "prompt"
        msgs = _messages(obj[key], key)
        used = {key}
    elif any(k in obj for k in ("prompt", "question", "instruction")):
        msgs = _user_prompt(obj)
        used = {"prompt", "question", "instruction", "input", "system"}
    else:
        raise DataError("missing (expected prompt, question, instruction or messages)", field="prompt")
    if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
        raise DataError("the prompt must end with a non-empty user message", field=key or "prompt")
    return PromptRecord(messages=msgs, meta={k: v for k, v in obj.items() if k not in used})


def _parse_text(obj: Any) -> TextRecord:
    if isinstance(obj, str):
        text = obj
    else:
        _need_dict(obj)
        text = _get(obj, "text")
    if not text.strip():
        raise DataError("empty text", field="text")
    return TextRecord(text=text)


def _need_dict(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")


_PARSERS = {"sft": _parse_sft, "oasst": _parse_oasst, "preference": _parse_preference,
            "unpaired": _parse_unpaired, "prompt": _parse_prompt, "text": _parse_text}


def parse_record(obj: Any, kind: str):
    """One decoded JSON value -> a typed record of `kind`, or `DataError` (which names the field)."""
    if kind not in _PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    try:
        return _PARSERS[kind](obj)
    except DataError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, RecursionError) as e:  # odd shapes
        raise DataError(f"malformed record ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------- files
def _read_values(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or item number, decoded JSON value) pairs; a line that is not JSON gives (line, DataError)."""
    name = str(path)
    try:
        if name.endswith(".json"):
            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 ({e})", path=name) from None
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON: {e.msg}", path=name, line=e.lineno) from None
            except RecursionError:
                raise DataError("malformed JSON: nested too deeply", path=name) from None
            yield from enumerate(data if isinstance(data, list) else [data], start=1)
            return
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for row in reader:   # the row's first line in the file (header = line 1)
                    yield reader.line_num, {k: v for k, v in row.items() if k is not None}
            return
        if name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError("reading .parquet needs pyarrow (pip install pyarrow)", path=name) from None
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises its own error types for a broken file
                raise DataError(f"cannot read parquet ({type(e).__name__}: {e})", path=name) from None
            yield from enumerate(rows, start=1)   # row numbers, as items of a .json list
            return
        if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
            raise DataError("unsupported file type (expected .json, .jsonl, .jsonl.gz, .parquet or .csv)", path=name)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    yield lineno, json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                    yield lineno, DataError(f"malformed JSON line ({type(e).__name__}: {e})", path=name, line=lineno)
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read file ({type(e).__name__}: {e})", path=name) from None


class Records(list):
    """A list of records with `summary`: {"path", "kind", "read", "kept", "skipped", "reasons", "examples"}."""

    summary: dict


def load_records(path: str | Path, kind: str, *, skip_invalid: bool = False, limit: int | None = None) -> Records:
    """Reads every record of a local .json (a list), .jsonl, .jsonl.gz, .parquet or .csv file as `kind` (see the
    module docstring). Lines of .csv files are counted with the header as line 1; .parquet rows from 1.

    Raises `DataError` (file, line, field) on the first bad record, unless `skip_invalid=True`: then bad records
    are skipped, counted by reason in `.summary` and logged as a warning. A file that cannot be read or decoded
    as a whole always raises. `limit` stops after that many kept records.
    """
    if kind not in _PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    path = Path(path)
    out, reasons, examples, read = Records(), {}, [], 0
    for lineno, value in _read_values(path):
        read += 1
        try:
            if isinstance(value, DataError):
                raise value
            out.append(parse_record(value, kind))
        except DataError as e:
            err = e.at(str(path), lineno)
            if not skip_invalid:
                raise DataError(err.reason + " (skip such records with skip_invalid=True, --data.skip-invalid in the "
                                "scripts)", path=err.path, line=err.line, field=err.field) from None
            key = f"{err.field}: {err.reason}" if err.field else err.reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
            if len(examples) < 5:
                examples.append(str(err))
        if limit is not None and len(out) >= limit:
            break
    if read == 0:
        raise DataError("no records: the file is empty", path=str(path))
    out.summary = {"path": str(path), "kind": kind, "read": read, "kept": len(out), "skipped": read - len(out),
                   "reasons": reasons, "examples": examples}
    if read - len(out):
        _log.warning("load_records: skipped %d of %d records in %s: %s", read - len(out), read, path, reasons)
    return out
