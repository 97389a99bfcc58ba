"""Tool calls: parsing generated text (Hermes and Llama-3 styles), the tool executor, schemas against transformers'
`get_json_schema`, and tool-use conversations as SFT data (records, loss mask, batches)."""
from __future__ import annotations

import gzip
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Literal

import pytest

from rlhf_jax.data import DataError, load_records, parse_record
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


# --------------------------------------------------------------------------------------------- SFT data
FIXTURES = Path(__file__).parent / "fixtures"
TOOL_DATA = FIXTURES / "tool-use-3.jsonl"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A Qwen2.5-style tokenizer folder: GPT-2's byte-level BPE with <|im_start|> / <|im_end|> added and Qwen2.5's
    own template (tests/fixtures/chat-templates/qwen2_5.jinja) in chat_template.jinja."""
    from tokenizers import AddedToken, Tokenizer

    out = tmp_path_factory.mktemp("qwen")
    with gzip.open(FIXTURES / "gpt2-tokenizer" / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
        tok = Tokenizer.from_str(f.read())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    shutil.copyfile(FIXTURES / "chat-templates" / "qwen2_5.jinja", out / "chat_template.jinja")
    return out


def _qwen_reply(m: dict) -> str:
    """What Qwen2.5's template writes for an assistant message after its header, end of turn included."""
    blocks = [f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {json.dumps(c["function"]["arguments"])}}}'
              "\n</tool_call>" for c in m.get("tool_calls", [])]
    return "\n".join(([m["content"]] if m["content"] else []) + blocks) + "<|im_end|>"


def test_tool_records_load_with_calls_and_schemas():
    records = load_records(TOOL_DATA, "sft")
    assert len(records) == 3 and all(r.tools for r in records)
    second = records[1]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "tool", "tool", "assistant",
                                                    "tool", "assistant"]
    assert [t["function"]["name"] for t in second.tools] == ["get_weather", "calculate"]
    assert second.messages[2]["tool_calls"][1] == {"type": "function",
                                                   "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    # arguments given as a JSON string are stored as the object, so that templates render a JSON object
    assert second.messages[5] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "18 - (-4)"}}}]}
    assert second.messages[3] == {"role": "tool", "name": "get_weather",
                                  "content": '{"sky": "clear", "temp_c": 18}'}


def test_tool_records_tokenise_as_transformers_with_the_loss_on_assistant_turns(qwen_folder):
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.tokenizer import HFTokenizer, encode_chat

    ours = HFTokenizer.from_file(qwen_folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(qwen_folder))
    for record in load_records(TOOL_DATA, "sft"):
        messages, tools = list(record.messages), list(record.tools)
        ids, mask = encode_chat(ours, messages, tools=tools)
        assert ids == list(ref.apply_chat_template(messages, tools=tools)["input_ids"])
        runs = [list(g) for k, g in itertools.groupby(zip(ids, mask), key=lambda t: t[1]) if k]
        decoded = [ours.decode([i for i, _ in r]) for r in runs]  # decode() skips the EOS <|im_end|> ...
        expected = [_qwen_reply(m).removesuffix("<|im_end|>") for m in messages if m["role"] == "assistant"]
        assert decoded == expected
        assert all(r[-1][0] == ours.eos_id for r in runs)  # ... which ends every masked run


def test_tool_records_batch_for_sft(qwen_folder):
    """`tokenize_sft` and `collate_sft` on tool conversations: the targets under the loss mask are the assistant
    turns (text and calls), never the results."""
    from rlhf_jax.data.batching import collate_sft, tokenize_sft
    from rlhf_jax.tokenizer import HFTokenizer, encode_chat

    tok = HFTokenizer.from_file(qwen_folder)
    records = load_records(TOOL_DATA, "sft")
    examples = [tokenize_sft(tok, r) for r in records]
    for ex, record in zip(examples, records):     # the whole row is the template's text, tool schemas included
        assert list(ex.ids) == encode_chat(tok, list(record.messages), tools=list(record.tools))[0]
    batch = collate_sft(examples, pad_id=tok.pad_id, buckets=(512,))
    assert batch["targets"].shape == (3, 512)
    for row, record in zip(range(3), records):
        lossy = tok._tok.decode([int(t) for t, k in zip(batch["targets"][row], batch["loss_mask"][row]) if k],
                                skip_special_tokens=False)
        assert lossy == "".join(_qwen_reply(m) for m in record.messages if m["role"] == "assistant")
        assert "tool_response" not in lossy and "temp_c" not in lossy


@pytest.mark.parametrize("message,field,reason", [
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
     "messages[1].tool_calls[0].function.name", "missing tool name"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": [1]}}]},
     "messages[1].tool_calls[0].function.arguments", "must be a JSON object, got list"),
    ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{oops"}]},
     "messages[1].tool_calls[0].arguments", "not JSON"),
    ({"role": "assistant", "tool_calls": []}, "messages[1].tool_calls", "non-empty list"),
    ({"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}, "messages[1].tool_calls", "only assistant"),
    ({"role": "tool", "content": "5", "name": 3}, "messages[1].name", "expected a string"),
])
def test_bad_tool_calls_name_file_line_and_field(tmp_path, message, field, reason):
    good = TOOL_DATA.read_text().splitlines()[0]
    bad = {"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "tools.jsonl"
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        load_records(path, "sft")
    assert (e.value.line, e.value.field) == (2, field) and reason in str(e.value)
    assert str(e.value).startswith(f"{path}:2: field {field!r}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("tools,field", [({"name": "f"}, "tools"), ([{"type": "function"}], "tools[0]"),
                                         ("[oops", "tools")])
def test_bad_tools_column(tools, field):
    with pytest.raises(DataError) as e:
        parse_record({"tools": tools, "messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}, "sft")
    assert e.value.field == field


def test_tools_as_a_json_string_and_prepared_records_keep_the_calls(tmp_path):
    """A `tools` column stored as a JSON string (as some Hub datasets do) reads as the list; records prepared as
    TFDS ArrayRecord read back with their tool calls and schemas."""
    from rlhf_jax.data import load_prepared, prepare_records

    row = json.loads(TOOL_DATA.read_text().splitlines()[0])
    assert parse_record({**row, "tools": json.dumps(row["tools"])}, "sft") == parse_record(row, "sft")
    prepare_records(TOOL_DATA, "sft", tmp_path)
    assert list(load_prepared("sft", tmp_path)) == list(load_records(TOOL_DATA, "sft"))


# ------------------------------------------------------------------------------------------- environments
def _scripted(replies):
    """A policy that writes the given replies in turn; each costs as many tokens as it has characters."""
    it = iter(replies)

    def policy(messages):
        reply = next(it)
        return reply, len(reply)
    return policy


def _hermes_call(expression):
    return f'<tool_call>\n{{"name": "calculate", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


@pytest.mark.parametrize("expression,expected", [("2+3*4", "14"), ("(2 + 3) * 4", "20"), ("-3*-2", "6"),
                                                 ("7 - (10 - 1)", "-2"), (" 12 ", "12")])
def test_calculate(expression, expected):
    from rlhf_jax.envs import CalculatorEnv

    assert execute_tool_call(CalculatorEnv().tools, {"name": "calculate", "arguments": {"expression": expression}}) \
        == expected
    assert int(expected) == eval(expression)  # the reference: Python on these literal strings


@pytest.mark.parametrize("expression,reason", [("2**10", "only integers"), ("6/3", "only integers"),
                                               ("1.5+1", "only integers"), ("__import__('os')", "only integers"),
                                               ("2 +", "not an arithmetic expression"), ("9" * 60 + "*" + "9" * 60,
                                                                                        "longer than 100 digits")])
def test_calculate_refuses_everything_else(expression, reason):
    from rlhf_jax.envs import CalculatorEnv

    out = execute_tool_call(CalculatorEnv().tools, {"name": "calculate", "arguments": {"expression": expression}})
    assert out.startswith("Error: calculate failed: ValueError") and reason in out


def test_calculator_episode_with_a_tool_call_then_the_answer():
    from rlhf_jax.envs import CalculatorEnv, EpisodeBudget, run_episode

    env = CalculatorEnv(system_prompt=None)
    ep = run_episode(env, {"expression": "17 * (3 + 4)"}, _scripted([_hermes_call("17 * (3 + 4)"), "It is 119."]),
                     budget=EpisodeBudget(max_turns=4))
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool", "assistant"]
    assert ep.messages[0]["content"] == "What is 17 * (3 + 4)?" and ep.messages[2]["content"] == "119"
    assert (ep.reward, ep.rewards, ep.turns, ep.finish) == (1.0, (0.0, 1.0), 2, "done")
    assert ep.tokens == len(_hermes_call("17 * (3 + 4)")) + len("It is 119.")


@pytest.mark.parametrize("replies,reward,tool_says", [
    (["The answer is 118."], 0.0, None),                                  # wrong, no tool
    (['{"name": "calculate", "parameters": {"expression": "6*7"}}', "42"], 1.0, "42"),   # Llama-3 style call
    (["<tool_call>{not json}</tool_call>", "42"], 1.0, "Error: malformed tool call: not valid JSON"),
    (['<tool_call>{"name": "calc", "arguments": {}}</tool_call>', "42"], 1.0, "Error: unknown tool 'calc'"),
    (['<tool_call>{"name": "calculate", "arguments": {"expr": "6*7"}}</tool_call>', "41"], 0.0,
     "Error: calculate: missing required argument(s) expression"),
])
def test_calculator_rewards_and_tool_errors(replies, reward, tool_says):
    from rlhf_jax.envs import CalculatorEnv, run_episode

    ep = run_episode(CalculatorEnv(), {"question": "What is six times seven?", "answer": 42}, _scripted(replies))
    assert ep.messages[0]["role"] == "system" and ep.reward == reward and ep.finish == "done"
    tool = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert tool == ([] if tool_says is None else [tool[0]]) and (tool_says is None or tool[0].startswith(tool_says))


def test_structured_tool_calls_and_parallel_calls():
    from rlhf_jax.envs import CalculatorEnv

    env = CalculatorEnv()
    env.reset({"expression": "1+1"})
    calls = [{"type": "function", "function": {"name": "calculate", "arguments": {"expression": e}}}
             for e in ("1+1", "2*3")]
    new, reward, done = env.step([{"role": "assistant", "content": "", "tool_calls": calls}])
    assert [m["content"] for m in new] == ["2", "6"] and (reward, done) == (0.0, False)
    new, _, _ = env.step([{"role": "assistant", "content": _hermes_call("1+1") + _hermes_call("3-5")}])
    assert [m["content"] for m in new] == ["2", "-2"]


@pytest.mark.parametrize("budget,finish,turns", [({"max_turns": 3}, "max_turns", 3),
                                                 ({"max_tokens": 150}, "max_tokens", 2)])
def test_budget_ends_an_endless_episode(budget, finish, turns):
    from rlhf_jax.envs import CalculatorEnv, EpisodeBudget, run_episode

    call = _hermes_call("1+1")                       # 82 characters: two calls pass 150 tokens
    ep = run_episode(CalculatorEnv(), {"expression": "1+1"}, _scripted([call] * 10), budget=EpisodeBudget(**budget))
    assert (ep.finish, ep.turns, ep.reward) == (finish, turns, 0.0)
    assert ep.messages[-1]["role"] == "tool"         # the last turn was still answered
    with pytest.raises(ValueError, match="max_turns must be a positive integer"):
        EpisodeBudget(max_turns=0)


def test_environments_by_name_and_import_path(tmp_path):
    from rlhf_jax.envs import (
        CalculatorEnv,
        Environment,
        calculator_tasks,
        make_environment,
    )

    assert isinstance(make_environment("calculator"), CalculatorEnv)
    env = make_environment("rlhf_jax.envs:CalculatorEnv", system_prompt="S")
    assert isinstance(env, Environment) and env.reset({"expression": "2*2"})[0] == {"role": "system", "content": "S"}
    (tmp_path / "my_env.py").write_text(
        "class Echo:\n    def __init__(self, reward=1.0):\n        self.reward = reward\n"
        "    def reset(self, task):\n        return [{'role': 'user', 'content': task}]\n"
        "    def step(self, messages):\n        return [], self.reward, True\n"
        "class NoStep:\n    def reset(self, task):\n        return []\n")
    echo = make_environment(f"{tmp_path / 'my_env.py'}:Echo", reward=0.5)
    assert echo.reset("hi") == [{"role": "user", "content": "hi"}] and echo.step([]) == ([], 0.5, True)
    for spec, reason in [("calculater", "expected a registered name (calculator, skills_retry)"),
                         ("rlhf_jax.envs:Nope", "has no Nope"), ("no_such_module_x:Env", "cannot import"),
                         (f"{tmp_path / 'my_env.py'}:NoStep", "needs reset(task) and step(messages)"),
                         (f"{tmp_path / 'missing.py'}:Echo", "no file")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            make_environment(spec)
    with pytest.raises(ValueError, match="cannot build it"):
        make_environment("calculator", unknown=1)
    tasks = calculator_tasks(20, seed=3)
    assert tasks == calculator_tasks(20, seed=3) and len({t["expression"] for t in tasks}) == 20
    for t in tasks:   # every generated task has the answer Python gives
        env.reset(t)
        assert env.answer == eval(t["expression"])


def test_the_docs_custom_environment_runs_as_written():
    """docs/tools.md's "Your own environment" block, executed as written (its asserts included)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "tools.md").read_text()
    section = text.split("### Your own environment", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(block, "docs/tools.md", "exec"), namespace)
    assert namespace["episode"].messages[-1]["content"] == "37"


@pytest.mark.parametrize("replies, reward, turns", [(["tzqk"], 1.0, 1), (["tzq", "tzqk"], 1.0, 2),
                                                    (["tzq", "tzqkk"], 0.0, 2)])
def test_skills_retry_feedback_then_a_second_try(replies, reward, turns):
    from rlhf_jax.envs import make_environment, run_episode
    env = make_environment("skills_retry")
    it = iter(replies)
    ep = run_episode(env, {"op": "reverse", "key": "kqzt"}, lambda messages: (next(it), 4))
    assert sum(ep.rewards) == reward and ep.turns == turns and ep.finish == "done"
    if turns == 2:
        assert ep.messages[2] == {"role": "user", "content": "wrong, try again"}
    tasks = env.tasks(5, seed=0)
    assert len({t["key"] for t in tasks}) == 5 and all(t["op"] == "reverse" for t in tasks)
    with pytest.raises(ValueError, match="skills_retry task"):
        env.reset({"question": "2 + 2"})
