"""Record parsing: real samples, errors naming file/line/field, skip_invalid summaries, hypothesis fuzzing."""
import gzip
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.data import (KINDS, DataError, PreferenceRecord, PromptRecord, SFTRecord, TextRecord, UnpairedRecord,
                           load_records, parse_record, unpair)

FIX = Path(__file__).parent / "fixtures"


def _norm(s):
    return re.sub(r"\s+", " ", s).strip()


def test_hh_rlhf_prompt_is_shared_prefix():
    raw = [json.loads(l) for l in gzip.open(FIX / "hh-rlhf-helpful-base-20.jsonl.gz", "rt")]
    recs = load_records(FIX / "hh-rlhf-helpful-base-20.jsonl.gz", "preference")
    assert len(recs) == 20 and recs.summary["skipped"] == 0
    for r, rec in zip(raw, recs):
        assert isinstance(rec, PreferenceRecord) and rec.prompt[-1]["role"] == "user"
        roles = [m["role"] for m in rec.prompt]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        prompt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in rec.prompt)
        assert _norm(prompt + "\n\nAssistant: " + rec.chosen) == _norm(r["chosen"])
        assert _norm(prompt + "\n\nAssistant: " + rec.rejected) == _norm(r["rejected"])
        assert r["chosen"].startswith(prompt.rstrip()[:50])


def _top_path(node):
    """Independent walk: the rank-0 (or only) reply at each level."""
    path = []
    while node is not None:
        path.append(("user" if node["role"] == "prompter" else "assistant", node["text"]))
        replies = [r for r in node.get("replies", []) if not r.get("deleted")]
        node = next((r for r in replies if r.get("rank") == 0), replies[0] if len(replies) == 1 else None)
    while path[-1][0] != "assistant":
        path.pop()
    return path


def test_oasst_top_ranked_path():
    trees = [json.loads(l) for l in open(FIX / "oasst-en-3-trees.jsonl")]
    recs = load_records(FIX / "oasst-en-3-trees.jsonl", "oasst")
    assert len(recs) == 3
    for tree, rec in zip(trees, recs):
        assert [(m["role"], m["content"]) for m in rec.messages] == _top_path(tree["prompt"])
        assert len(rec.messages) >= 2 and rec.messages[-1]["role"] == "assistant"


def test_alpaca_flan_prompt_text_shapes():
    raw = [json.loads(l) for l in open(FIX / "alpaca-seed-tasks-20.jsonl")]
    recs = load_records(FIX / "alpaca-seed-tasks-20.jsonl", "sft")
    for r, rec in zip(raw, recs):
        want = r["instruction"] + ("\n\n" + r["input"] if r["input"].strip() else "")
        assert rec.messages == ({"role": "user", "content": want}, {"role": "assistant", "content": r["output"]})
    flan = load_records(FIX / "flan-commonsense-qa-10.jsonl", "sft")
    assert len(flan) == 10 and all(not m.messages[-1]["content"].endswith("<|endoftext|>") for m in flan)
    prompts = load_records(FIX / "oasst-prompts-10.jsonl", "prompt")
    assert prompts[0] == PromptRecord(messages=({"role": "user", "content": "Can you tell me about GLaDOS?"},))
    assert parse_record({"question": "1+1?", "answer": "2"}, "prompt").meta == {"answer": "2"}
    assert parse_record({"text": "abc"}, "text") == TextRecord(text="abc")
    sys_rec = parse_record({"system": "S", "prompt": "p", "response": "r"}, "sft")
    assert [m["role"] for m in sys_rec.messages] == ["system", "user", "assistant"]
    dpo = parse_record({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                        "rejected": {"from": "gpt", "value": "b"}}, "preference")
    assert dpo == PreferenceRecord(prompt=({"role": "user", "content": "q"},), chosen="a", rejected="b")


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("line,field,reason", [
    ('{"prompt": "p", "chosen": "a",', None, "malformed JSON"),
    ('{"prompt": "p", "chosen": "a"}', "rejected", "missing"),
    ('{"prompt": "p", "chosen": "a", "rejected": "  "}', "rejected", "empty"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "chosen", "expected a string"),
    ('[1, 2]', None, "expected a JSON object"),
])
def test_errors_name_file_line_field(tmp_path, line, field, reason):
    p = _write(tmp_path, "d.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(DataError) as e:
        load_records(p, "preference")
    assert (e.value.path, e.value.line, e.value.field) == (str(p), 3, field)
    assert reason in str(e.value) and f"d.jsonl:3" in str(e.value)
    recs = load_records(p, "preference", skip_invalid=True)
    assert len(recs) == 2 and recs.summary["skipped"] == 1 and recs.summary["read"] == 3
    assert sum(recs.summary["reasons"].values()) == 1 and "d.jsonl:3" in recs.summary["examples"][0]


def test_json_list_items_and_file_errors(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "i", "output": ""}]))
    with pytest.raises(DataError, match=r"d.json:2: field 'output': empty"):
        load_records(p, "sft")
    (tmp_path / "bad.json").write_text('[{"a": 1},\n oops]')
    with pytest.raises(DataError, match=r"bad.json:2: malformed JSON"):
        load_records(tmp_path / "bad.json", "sft", skip_invalid=True)  # a broken file cannot be partly read
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "x.jsonl.gz", "text")
    with pytest.raises(DataError, match="unsupported"):
        load_records(tmp_path / "x.tsv", "text")
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records(p, "nope")


def test_unpaired_records_plain_and_conversational_and_their_errors(tmp_path):
    q = ({"role": "user", "content": "q"},)
    assert parse_record({"prompt": "q", "completion": "a", "label": True}, "unpaired") == \
        UnpairedRecord(prompt=q, completion="a", label=True)
    conv = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "b"}],
            "label": False}                                               # TRL's conversational form
    assert parse_record(conv, "unpaired") == UnpairedRecord(prompt=q, completion="b", label=False)
    p = _write(tmp_path, "kto.jsonl", [json.dumps(conv), json.dumps({**conv, "label": "yes"}),
                                       json.dumps({"prompt": "q", "label": True})])
    with pytest.raises(DataError, match=r"kto.jsonl:2: field 'label': expected true or false, got \"yes\""):
        load_records(p, "unpaired")
    recs = load_records(p, "unpaired", skip_invalid=True)
    assert len(recs) == 1 and recs.summary["skipped"] == 2
    with pytest.raises(DataError, match="field 'completion': expected an assistant message"):
        parse_record({**conv, "completion": [{"role": "user", "content": "b"}]}, "unpaired")
    pairs = [PreferenceRecord(prompt=q, chosen="a", rejected="b")]
    assert unpair(pairs) == [UnpairedRecord(prompt=q, completion="a", label=True),
                             UnpairedRecord(prompt=q, completion="b", label=False)]


def test_oasst_and_sft_specific_errors():
    with pytest.raises(DataError, match="no assistant reply"):
        parse_record({"prompt": {"role": "prompter", "text": "q", "replies": []}}, "oasst")
    with pytest.raises(DataError, match="last message must be from the assistant"):
        parse_record({"messages": [{"role": "user", "content": "q"}]}, "sft")
    with pytest.raises(DataError, match="unknown role"):
        parse_record({"messages": [{"role": "wizard", "content": "q"}]}, "sft")
    with pytest.raises(DataError, match="share no prefix"):
        parse_record({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}, "preference")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "chosen", "rejected", "messages", "role", "content", "text", "instruction",
                         "output", "input", "replies", "rank", "completion", "conversations", "from", "value",
                         "question", "answer", "deleted", "system"]) | st.text(max_size=5), children, max_size=5),
    max_leaves=15)


@settings(max_examples=100, deadline=None)
@given(json_values, st.sampled_from(KINDS))
def test_fuzz_parse_record(value, kind):
    try:
        rec = parse_record(value, kind)
    except DataError:
        return
    assert isinstance(rec, (SFTRecord, PreferenceRecord, UnpairedRecord, PromptRecord, TextRecord))
    msgs = getattr(rec, "messages", None) or getattr(rec, "prompt", ())
    assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in msgs)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(KINDS), st.sampled_from([".jsonl", ".json", ".jsonl.gz"]),
       st.booleans())
def test_fuzz_files(tmp_path_factory, data, kind, suffix, skip):
    p = tmp_path_factory.mktemp("fuzz") / ("f" + suffix)
    p.write_bytes(gzip.compress(data) if suffix == ".jsonl.gz" else data)
    try:
        recs = load_records(p, kind, skip_invalid=skip)
    except DataError:
        return
    assert recs.summary["kept"] + recs.summary["skipped"] == recs.summary["read"]


def test_trl_implicit_prompt_pairs_conversational_sft_and_typed_parts(tmp_path):
    """TRL's remaining layouts: preference pairs as two whole conversations with no prompt field (the layout of
    trl-lib/ultrafeedback_binarized), SFT prompt-completion as message lists, content as typed text parts."""
    user = {"role": "user", "content": "2+2?"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"chosen": [user, {"role": "assistant", "content": "4"}],
                                "rejected": [user, {"role": "assistant", "content": "5"}]}) + "\n")
    (pair,) = load_records(path, "preference")
    assert pair.prompt == (user,) and (pair.chosen, pair.rejected) == ("4", "5")
    path.write_text(json.dumps({"chosen": [user, {"role": "assistant", "content": "4"}],
                                "rejected": [{"role": "user", "content": "3+3?"},
                                             {"role": "assistant", "content": "5"}]}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'rejected': .*differ before their last"):
        load_records(path, "preference")
    parts = [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": parts}],
                                "completion": [{"role": "assistant", "content": "4"}]}) + "\n")
    (record,) = load_records(path, "sft")
    assert record.messages == (user, {"role": "assistant", "content": "4"})
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                                             {"role": "assistant", "content": "4"}]}) + "\n")
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.content\[0\]'.*only text parts.*'image'"):
        load_records(path, "sft")
    path.write_text(json.dumps({"prompt": [user], "completion": [{"role": "user", "content": "4"}]}) + "\n")
    with pytest.raises(DataError, match="field 'completion'.*assistant messages only"):
        load_records(path, "sft")
