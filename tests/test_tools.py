"""Tool calls: parsing generated text (Hermes and Llama-3 styles), the tool executor, schemas against transformers'
`get_json_schema`, and tool-use conversations as SFT data (records, loss mask, batches)."""
from __future__ import annotations

import json
from typing import Literal

import pytest

from rlhf_jax.tools import (
    MalformedCall,
    check_arguments,
    execute_tool_call,
    make_tool,
    malformed_call_message,
    parse_tool_calls,
    parse_tool_calls_report,
    tool_schema,
)


# ------------------------------------------------------------------------------------------------- parsing
def test_hermes_several_calls_with_text_around():
    text = ('Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call> done')
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                      {"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert parse_tool_calls(text, style="hermes") == parse_tool_calls(text)
    # the Llama-3 reader finds the same JSON objects (it reads "arguments" when "parameters" is absent)
    assert parse_tool_calls(text, style="llama3") == parse_tool_calls(text)


def test_llama3_call_and_text_around():
    text = 'Sure. {"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}} <|eot_id|>'
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]
    assert parse_tool_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', style="llama3") == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}]
    two = '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": {"name": "nested"}}}'
    assert [c["name"] for c in parse_tool_calls(two)] == ["a", "b"]  # a nested "name" is not a call of its own


def test_no_call_is_no_call():
    for text in ("", "The answer is 5.", "{not json at all", '{"answer": 5}'):
        assert parse_tool_calls_report(text) == ([], [])


@pytest.mark.parametrize("text,reason", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 2,}}\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"arguments": {"a": 2}}\n</tool_call>', "missing \"name\""),
    ('<tool_call>\n{"name": "add", "arguments": [2, 3]}\n</tool_call>', "must be a JSON object, got list"),
    ('<tool_call>\n{"name": "add", "arguments": "a=2"}\n</tool_call>', "string that is not JSON"),
    ('<tool_call>\n["add"]\n</tool_call>', "expected a JSON object"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}', "without its closing"),
    ('{"name": "add", "parameters": {"a": 2', "not valid JSON"),
    ('{"name": "add", "parameters": 7}', "must be a JSON object, got int"),
    ('{"name": "", "parameters": {}}', "missing \"name\""),
])
def test_malformed_calls_are_counted_not_raised(text, reason):
    calls, bad = parse_tool_calls_report(text)
    assert calls == [] and len(bad) == 1 and reason in bad[0].reason
    message = malformed_call_message(bad[0])
    assert message["role"] == "tool" and message["content"].startswith("Error: malformed tool call: ")
    assert parse_tool_calls(text) == []


def test_good_and_bad_calls_in_one_reply():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": </tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>')
    calls, bad = parse_tool_calls_report(text)
    assert calls == [{"name": "add", "arguments": {"a": 1, "b": 2}},
                     {"name": "get_weather", "arguments": {"city": "Rome"}}]  # a JSON-string argument is decoded
    assert bad == [MalformedCall(text='{"name": "add", "arguments": {"a":', reason=bad[0].reason)]


def test_unknown_style_is_refused():
    with pytest.raises(ValueError, match="style"):
        parse_tool_calls("x", style="mistral")


def test_round_trip_through_the_plain_format():
    """What the plain chat format writes for a call is what the Hermes parser reads back."""
    from rlhf_jax.tokenizer import ByteTokenizer, encode_chat

    tok = ByteTokenizer()
    calls = [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "neg", "arguments": {"x": -1}}]
    message = {"role": "assistant", "content": "Adding.",
               "tool_calls": [{"type": "function", "function": c} for c in calls]}
    ids, mask = encode_chat(tok, [{"role": "user", "content": "2+3?"}, message])
    assert parse_tool_calls(tok.decode([i for i, k in zip(ids, mask) if k])) == calls


# ------------------------------------------------------------------------------------------------ executor
def add(a: int, b: int) -> int:
    """Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        Their sum.
    """
    return a + b


def divide(a: float, b: float, rounding: Literal["none", "floor"] = "none") -> float:
    """Divides a by b.

    Args:
        a: The numerator.
        b (float): The denominator, which
            must not be zero.
        rounding: How to round the result.
    """
    return a // b if rounding == "floor" else a / b


def lookup(city: str, units: list[str] | None = None) -> dict:
    """Looks up a city.

    Args:
        city: The city.
        units: Units to report in.
    """
    return {"city": city, "units": units}


@pytest.mark.parametrize("fn", [add, divide, lookup])
def test_schema_matches_transformers(fn):
    get_json_schema = pytest.importorskip("transformers.utils").get_json_schema
    assert json.dumps(tool_schema(fn)) == json.dumps(get_json_schema(fn))  # same keys, same order


TOOLS = [make_tool(add), make_tool(divide), make_tool(lookup)]


@pytest.mark.parametrize("call,expected", [
    ({"name": "add", "arguments": {"a": 2, "b": 3}}, "5"),
    ({"name": "divide", "arguments": {"a": 7, "b": 2, "rounding": "floor"}}, "3"),
    ({"name": "lookup", "arguments": {"city": "Oslo"}}, '{"city": "Oslo", "units": null}'),
    ({"name": "mul", "arguments": {"a": 2}}, "Error: unknown tool 'mul'; available tools: add, divide, lookup"),
    ({"name": "add", "arguments": {"a": 2}}, "Error: add: missing required argument(s) b"),
    ({"name": "add", "arguments": {"a": 2, "b": 3, "c": 4}}, "Error: add: unknown argument(s) c (expected a, b)"),
    ({"name": "add", "arguments": {"a": "2", "b": 3}}, "Error: add: argument 'a' must be integer, got \"2\""),
    ({"name": "add", "arguments": {"a": True, "b": 3}}, "Error: add: argument 'a' must be integer, got true"),
    ({"name": "divide", "arguments": {"a": 1, "b": 2, "rounding": "up"}},
     "Error: divide: argument 'rounding' must be one of ['none', 'floor'], got \"up\""),
    ({"name": "divide", "arguments": {"a": 1, "b": 0}}, "Error: divide failed: ZeroDivisionError: division by zero"),
    ({"name": "add", "arguments": [1, 2]}, "Error: arguments of add must be a JSON object, got list"),
])
def test_execute_never_raises(call, expected):
    assert execute_tool_call(TOOLS, call) == expected


def test_check_arguments_against_a_hand_written_schema():
    schema = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "number"}, "y": {"type": ["string", "null"]}},
        "required": ["x"]}}}
    assert check_arguments(schema, {"x": 1.5, "y": None}) is None
    assert check_arguments(schema, {"x": 1, "y": "s"}) is None
    assert "must be number" in check_arguments(schema, {"x": "1"})
    assert "must be ['string', 'null']" in check_arguments(schema, {"x": 1, "y": 2})
