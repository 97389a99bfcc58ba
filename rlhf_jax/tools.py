"""Tool calls in generated text, and the host-side tools that answer them.

A tool-using policy writes its calls in the format its chat template taught it (see `rlhf_jax.tokenizer`):

- "hermes" (Qwen2.5, Qwen3, NousResearch Hermes): one block per call, any number of them, anywhere in the reply:
  `<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>`.
- "llama3" (Llama-3.1/3.2 JSON tool calling): the reply is a JSON object `{"name": ..., "parameters": {...}}`
  (Llama-3.1 may prefix `<|python_tag|>`); we read every such object in the text, so several calls and text
  around them are accepted. `"arguments"` is read when `"parameters"` is absent.
- "auto": "hermes" when the text holds `<tool_call>`, else "llama3".

A call is `{"name": str, "arguments": dict}`. Parsing never raises: `parse_tool_calls_report` returns the calls
that parsed and one `MalformedCall` per call that did not (bad JSON, no name, arguments not an object, an
unclosed block), so a rollout can count them and `malformed_call_message` can tell the model what was wrong in a
`tool` message. `parse_tool_calls` returns the calls only.

Tools: a `Tool` is a Python function plus its JSON schema (`{"type": "function", "function": {"name",
"description", "parameters"}}`, the layout chat templates read); `tool_schema(fn)` derives the schema from type
hints and a Google-style docstring as `transformers.utils.get_json_schema` does. `execute_tool_call(tools, call)`
checks the arguments against the schema and runs the function; an unknown tool, wrong arguments or an exception
come back as an error string (`"Error: ..."`), never raised, since the model's mistakes are part of the episode.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Any, Callable, Mapping, Sequence

__all__ = ["STYLES", "MalformedCall", "parse_tool_calls", "parse_tool_calls_report", "malformed_call_message",
           "tool_message", "Tool", "make_tool", "tool_schema", "check_arguments", "execute_tool_call"]

STYLES = ("auto", "hermes", "llama3")

_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
_LLAMA_START = re.compile(r'\{\s*"name"\s*:')


@dataclasses.dataclass(frozen=True, kw_only=True)
class MalformedCall:
    """A call the model tried to make but wrote wrongly."""

    text: str
    """The call's text as generated (a hermes block's body, or the JSON from its opening brace)."""
    reason: str
    """What is wrong, in words the model can act on."""


def _as_call(obj: Any, args_key: str) -> dict | str:
    """A decoded JSON value -> {"name", "arguments"}, or the reason it is not a call."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with \"name\" and \"{args_key}\", got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return "missing \"name\" (a non-empty string)"
    key = args_key if args_key in obj or "arguments" not in obj else "arguments"
    args = obj.get(key, {})
    if isinstance(args, str):   # arguments written as a JSON string (the OpenAI layout)
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return f"\"{key}\" is a string that is not JSON"
    if not isinstance(args, dict):
        return f"\"{key}\" must be a JSON object, got {type(args).__name__}"
    return {"name": name.strip(), "arguments": args}


def _hermes(text: str) -> tuple[list[dict], list[MalformedCall]]:
    calls, bad = [], []
    for m in _HERMES_BLOCK.finditer(text):
        body = m.group(1).strip()
        if not m.group(2):
            bad.append(MalformedCall(text=body, reason="<tool_call> without its closing </tool_call>"))
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            bad.append(MalformedCall(text=body, reason=f"not valid JSON ({e.msg} at character {e.pos})"))
            continue
        call = _as_call(obj, "arguments")
        (calls.append(call) if isinstance(call, dict) else bad.append(MalformedCall(text=body, reason=call)))
    return calls, bad


def _llama3(text: str) -> tuple[list[dict], list[MalformedCall]]:
    calls, bad, pos = [], [], 0
    decoder = json.JSONDecoder()
    text = text.replace("<|python_tag|>", "")
    while (m := _LLAMA_START.search(text, pos)) is not None:
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError as e:
            bad.append(MalformedCall(text=text[m.start():].strip(),
                                     reason=f"not valid JSON ({e.msg} at character {e.pos - m.start()})"))
            pos = m.end()
            continue
        call = _as_call(obj, "parameters")
        if isinstance(call, dict):
            calls.append(call)
        else:
            bad.append(MalformedCall(text=text[m.start():end], reason=call))
        pos = end
    return calls, bad


def parse_tool_calls_report(text: str, *, style: str = "auto") -> tuple[list[dict], list[MalformedCall]]:
    """(calls, malformed) of a generated reply: `[{"name": str, "arguments": dict}]` in order of appearance, and a
    `MalformedCall` for each call written wrongly (`len(malformed)` counts them). Never raises on any text."""
    if style not in STYLES:
        raise ValueError(f"unknown tool-call style {style!r}; expected one of {STYLES}")
    if style == "auto":
        style = "hermes" if "<tool_call>" in text else "llama3"
    return _hermes(text) if style == "hermes" else _llama3(text)


def parse_tool_calls(text: str, *, style: str = "auto") -> list[dict]:
    """The well-formed tool calls of a reply, `[{"name": str, "arguments": dict}]`; malformed ones are left out
    (count them with `parse_tool_calls_report`). Never raises on any text."""
    return parse_tool_calls_report(text, style=style)[0]


def tool_message(content: str, *, name: str | None = None) -> dict:
    """A tool result as the message chat templates read: {"role": "tool", "content": ..., "name": ...}."""
    return {"role": "tool", "content": content} | ({"name": name} if name else {})


def malformed_call_message(error: MalformedCall) -> dict:
    """The `tool` message fed back to the model after a malformed call, so that it can retry."""
    snippet = error.text if len(error.text) <= 200 else error.text[:200] + "..."
    return tool_message(f"Error: malformed tool call: {error.reason}. The call was: {snippet}")


# ------------------------------------------------------------------------------------------------------- tools
@dataclasses.dataclass(frozen=True, kw_only=True)
class Tool:
    """A function the model may call and the JSON schema that describes it to the model."""

    fn: Callable[..., Any]
    """Called with the call's arguments as keywords; its result is sent back (a str as is, else JSON)."""
    schema: dict
    """{"type": "function", "function": {"name", "description", "parameters"}}."""

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def make_tool(fn: Callable[..., Any], schema: dict | None = None) -> Tool:
    """A `Tool` of `fn`, with `schema` or, if None, the one `tool_schema(fn)` derives."""
    return Tool(fn=fn, schema=tool_schema(fn) if schema is None else schema)


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
               type(None): "null"}


def _type_schema(hint: Any, where: str) -> dict:
    """A Python type hint -> JSON schema (the subset transformers' `get_json_schema` writes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is typing.Literal:
        return {"type": _JSON_TYPES[type(args[0])], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        subs = [_type_schema(a, where) for a in args if a is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(set(s) == {"type"} for s in subs):
            out = {"type": [s["type"] for s in subs]}
        else:
            out = {"anyOf": subs}
        return out | ({"nullable": True} if type(None) in args else {})
    if origin is list:
        return {"type": "array"} | ({"items": _type_schema(args[0], where)} if args else {})
    if origin is dict:
        return {"type": "object"} | ({"additionalProperties": _type_schema(args[1], where)} if args else {})
    raise TypeError(f"tool_schema: cannot write {hint!r} ({where}) as a JSON schema type")


def _docstring(fn: Callable) -> tuple[str, dict[str, str], str | None]:
    """(description, {argument: description}, returns) from a Google-style docstring: the text before the first
    `Args:` / `Returns:` / `Raises:` line, one `name: text` entry per argument (continued on more indented lines),
    and the `Returns:` text."""
    doc = inspect.getdoc(fn) or ""
    sections = re.split(r"^(Args|Returns|Raises):[ \t]*$", doc, flags=re.MULTILINE)
    head, parts = sections[0], dict(zip(sections[1::2], sections[2::2]))
    described: dict[str, str] = {}
    name, indent = None, 0
    for line in parts.get("Args", "").splitlines():
        m = re.match(r"(\s+)(\w+)(?:\s*\([^()]*\))?\s*:\s*(.*)", line)
        if m and (name is None or len(m.group(1)) <= indent):
            name, indent = m.group(2), len(m.group(1))
            described[name] = m.group(3).strip()
        elif name is not None and line.strip():
            described[name] = (described[name] + " " + line.strip()).strip()
    returns = parts.get("Returns", "").strip() or None
    return head.strip(), described, returns


def tool_schema(fn: Callable[..., Any]) -> dict:
    """The JSON schema of a typed function with a Google-style docstring, as transformers'
    `get_json_schema(fn)` writes it: name, description (the docstring before `Args:`), one property per
    parameter with its type and description (parameters without a default are required), and the return type
    with the `Returns:` text when the function annotates it. (transformers' "(choices: [...])" suffix is not
    read: use `Literal[...]`.)"""
    description, described, returns = _docstring(fn)
    if not description:
        raise ValueError(f"tool_schema: {fn.__name__} needs a docstring (what the tool does, then Args:)")
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.name not in hints:
            raise TypeError(f"tool_schema: argument {p.name!r} of {fn.__name__} has no type hint")
        if p.name not in described:
            raise ValueError(f"tool_schema: argument {p.name!r} of {fn.__name__} is not described under Args:")
        properties[p.name] = _type_schema(hints[p.name], f"argument {p.name!r}") | {"description": described[p.name]}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties} | ({"required": required} if required else {})
    function = {"name": fn.__name__, "description": description, "parameters": parameters}
    if "return" in hints:
        function["return"] = _type_schema(hints["return"], "return") | ({"description": returns} if returns else {})
    return {"type": "function", "function": function}


def _type_ok(value: Any, spec: dict) -> bool:
    if value is None and spec.get("nullable"):
        return True
    if "anyOf" in spec:
        return any(_type_ok(value, s) for s in spec["anyOf"])
    kinds = spec.get("type")
    if kinds is None:
        return True
    checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
              "null": lambda v: v is None}
    ok = any(checks.get(k, lambda v: True)(value) for k in ([kinds] if isinstance(kinds, str) else kinds))
    return ok and ("enum" not in spec or value in spec["enum"])


def check_arguments(schema: dict, arguments: Mapping[str, Any]) -> str | None:
    """None when `arguments` fit the tool's `parameters` schema (required present, no unknown names, JSON types
    and enums), else what is wrong."""
    params = schema.get("function", schema).get("parameters") or {}
    properties = params.get("properties") or {}
    missing = [k for k in params.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(missing)}"
    unknown = [k for k in arguments if k not in properties]
    if unknown and params.get("additionalProperties") is not True:
        return f"unknown argument(s) {', '.join(unknown)} (expected {', '.join(properties) or 'none'})"
    for k, v in arguments.items():
        if k in properties and not _type_ok(v, properties[k]):
            spec = properties[k]
            want = spec.get("type", "a value") if "enum" not in spec else f"one of {spec['enum']}"
            return f"argument {k!r} must be {want}, got {json.dumps(v)}"
    return None


def execute_tool_call(tools: Mapping[str, Tool] | Sequence[Tool], call: Mapping[str, Any]) -> str:
    """Runs one parsed call `{"name", "arguments"}` and returns the text sent back to the model: the function's
    result (a str as is, anything else as JSON), or `"Error: ..."` for an unknown tool, arguments that do not fit
    the schema, or an exception in the tool. Never raises for the model's mistakes."""
    by_name = dict(tools) if isinstance(tools, Mapping) else {t.name: t for t in tools}
    name, arguments = call.get("name"), call.get("arguments", {})
    if name not in by_name:
        return f"Error: unknown tool {name!r}; available tools: {', '.join(sorted(by_name)) or 'none'}"
    if not isinstance(arguments, Mapping):
        return f"Error: arguments of {name} must be a JSON object, got {type(arguments).__name__}"
    tool = by_name[name]
    problem = check_arguments(tool.schema, arguments)
    if problem is not None:
        return f"Error: {name}: {problem}"
    try:
        result = tool.fn(**arguments)
    except Exception as e:  # noqa: BLE001  (a tool's failure is reported to the model, as a tool result)
        return f"Error: {name} failed: {type(e).__name__}: {e}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)
