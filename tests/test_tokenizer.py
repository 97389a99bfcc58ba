"""Tokenizers and chat formats: known GPT-2 ids, byte round trips, loss masks, Jinja templates vs transformers."""
import gzip
import json
from pathlib import Path

import pytest

from rlhf_jax.tokenizer import ByteTokenizer, ChatFormat, HFTokenizer, encode_chat, encode_prompt, render_template

FIX = Path(__file__).parent / "fixtures"
GPT2 = FIX / "gpt2-tokenizer" / "tokenizer.json.gz"
CHATML = FIX / "chatml-config" / "tokenizer_config.json"
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "No. ☃"}]


@pytest.fixture(scope="module")
def gpt2():
    return HFTokenizer.from_file(GPT2)


@pytest.fixture(scope="module")
def chatml():
    return HFTokenizer.from_file(GPT2, config_path=CHATML)


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    text = "héllo wörld ☃ \n\t"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    assert tok.decode([257] + ids + [258, 256, 256]) == text


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == gpt2.bos_id == gpt2.pad_id == 50256  # GPT-2 has one special token
    text = "The quick brown fox, naïvely: 1234!"
    assert gpt2.decode(gpt2.encode(text) + [50256]) == text
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_folder_loading_reads_config(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(gzip.decompress(GPT2.read_bytes()))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    tok = HFTokenizer.from_file(tmp_path)
    assert tok.eos_id == tok.bos_id == 50256 and tok.pad_id == 50257 and tok.vocab_size == 50258


def _expected_plain(tok, conv):
    """Independent spelling of the default format: (ids, mask)."""
    ids, mask = [tok.bos_id], [0]
    for m in conv:
        if m["role"] == "assistant":
            head = tok.encode("<|assistant|>\n")
            body = tok.encode(m["content"]) + [tok.eos_id]
            ids, mask = ids + head + body, mask + [0] * len(head) + [1] * len(body)
        else:
            t = tok.encode(f"<|{m['role']}|>\n{m['content']}\n")
            ids, mask = ids + t, mask + [0] * len(t)
    return ids, mask


@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_default_chat_format(name, gpt2):
    tok = ByteTokenizer() if name == "byte" else gpt2
    ids, mask = encode_chat(tok, CONV)
    assert (ids, mask) == _expected_plain(tok, CONV)
    # the loss covers exactly the assistant replies and their EOS
    assert [i for i, k in zip(ids, mask) if k].count(tok.eos_id) == 2
    assert tok.decode([i for i, k in zip(ids, mask) if k]) == "Hello! How can I help?No. ☃"
    prompt = encode_prompt(tok, CONV[:-1])
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|assistant|>\n")


def test_chat_format_options():
    tok = ByteTokenizer()
    fmt = ChatFormat(user_header="Q: ", assistant_header="A: ", turn_end="\n", add_bos=False)
    ids, mask = encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], fmt)
    assert ids == list(b"Q: x\nA: y") + [258] and mask == [0] * 8 + [1, 1]


def test_bad_messages_raise():
    with pytest.raises(ValueError, match="message 0"):
        encode_chat(ByteTokenizer(), [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="message 1"):
        encode_prompt(ByteTokenizer(), [{"role": "user", "content": "x"}, {"role": "user", "content": 3}])


def test_jinja_template_matches_transformers(chatml):
    from transformers import PreTrainedTokenizerFast

    template = json.loads(CHATML.read_text())["chat_template"]
    assert chatml.chat_format is not None and chatml.eos_id == chatml.token_to_id("<|im_end|>")
    hf = PreTrainedTokenizerFast(tokenizer_object=chatml._tok, eos_token="<|im_end|>")
    conv = CONV[1:]  # the template adds its default system turn
    ids, mask = encode_chat(chatml, conv)
    ref = hf.apply_chat_template(conv, tokenize=True, chat_template=template)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert ids == list(ref)
    assert render_template(template, conv) == hf.apply_chat_template(conv, tokenize=False, chat_template=template)
    im_end = chatml.token_to_id("<|im_end|>")
    lossy = [i for i, k in zip(ids, mask) if k]
    assert chatml._tok.decode(lossy, skip_special_tokens=False) == "Hello! How can I help?<|im_end|>No. ☃<|im_end|>"
    assert lossy.count(im_end) == 2 and ids[-1] != im_end and mask[-1] == 0  # the newline after <|im_end|>
    prompt = encode_prompt(chatml, conv[:-1])
    ref_prompt = hf.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True, chat_template=template)
    ref_prompt = ref_prompt["input_ids"] if hasattr(ref_prompt, "keys") else ref_prompt
    assert prompt == list(ref_prompt) and ids[: len(prompt)] == prompt


def test_jinja_not_prefix_stable_raises(gpt2):
    fmt = ChatFormat(template="{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="cannot find assistant message"):
        encode_chat(gpt2, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], fmt)
