"""Chat templates against `transformers.apply_chat_template`, token for token, on real templates.

Templates (tests/fixtures/chat-templates, sources in tests/fixtures/README.md): Qwen2.5-Instruct's, Llama-3.2-Instruct's
(it calls `strftime_now`), Phi-3's and Zephyr / TinyLlama-Chat's on a SentencePiece-style tokenizer, and TRL's Qwen2.5
training template with `{% generation %}` markers. Each folder is written the way current transformers writes one
(the template in chat_template.jinja) and loaded by both sides from the same files.
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
    "llama3_2": dict(eos="<|eot_id|>", bos="<|begin_of_text|>",
                     extra=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "zephyr": dict(eos="</s>", bos="<s>", extra=[]),
    "phi3": dict(eos="<|endoftext|>", bos="<s>", extra=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                                         "<|endoftext|>"]),
}


def _folder(tmp_path: Path, name: str) -> Path:
    """A tokenizer folder as transformers >= 4.47 writes it: tokenizer.json, tokenizer_config.json without the
    template, chat_template.jinja. GPT-2's byte-level BPE for the Qwen and Llama-3 templates (the same kind of
    tokenizer as theirs), the SentencePiece-style one (class LlamaTokenizer) for Zephyr and Phi-3."""
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


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(SPECIALS))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_ids_match_apply_chat_template(tmp_path, name, conv):
    folder = _folder(tmp_path, name)
    ours = HFTokenizer.from_file(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = CONVERSATIONS[conv]
    assert ours.chat_format is not None and ours.chat_format.template == ref.chat_template  # read from the .jinja
    ids, mask = encode_chat(ours, messages)
    assert ids == _ids(ref.apply_chat_template(messages, tokenize=True))
    for k in range(1, len(messages), 2):  # every rollout prompt: the conversation up to a reply
        prompt = encode_prompt(ours, messages[:k])
        assert prompt == _ids(ref.apply_chat_template(messages[:k], tokenize=True, add_generation_prompt=True))
    assert len(mask) == len(ids) and sum(mask) > 0


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_generation_markers_give_transformers_assistant_masks(tmp_path, conv):
    folder = _folder(tmp_path, "qwen2_5_training")
    ours = HFTokenizer.from_file(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = CONVERSATIONS[conv]
    ids, mask = encode_chat(ours, messages)
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])


@pytest.mark.parametrize("name", ["qwen2_5", "llama3_2", "zephyr", "phi3"])
def test_loss_covers_each_reply_and_its_end_of_turn(tmp_path, name):
    """Without generation markers: every token overlapping a reply's rendered text, through its first EOS."""
    ours = HFTokenizer.from_file(_folder(tmp_path, name))
    messages = CONVERSATIONS[1]
    ids, mask = encode_chat(ours, messages)
    lossy = ours._tok.decode([i for i, k in zip(ids, mask) if k], skip_special_tokens=False)
    for m in messages:
        text = m["content"].strip() if name == "llama3_2" else m["content"]  # Llama-3 trims every message
        assert (text.strip() in lossy) == (m["role"] == "assistant"), (m, lossy)
    end = {"qwen2_5": "<|im_end|>", "llama3_2": "<|eot_id|>", "zephyr": "</s>", "phi3": "<|end|>"}[name]
    assert lossy.count(end) == 3  # each of the three replies ends its turn inside the loss
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
