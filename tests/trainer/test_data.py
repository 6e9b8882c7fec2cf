"""JSONL loaders (errors name file and line), tokenization with and without a chat template,
padding masks, and the built-in byte-level tokenizer."""
import json

import pytest

from rlhf_fast.data import DataError, load_preferences, load_prompts, load_sft, write_jsonl
from rlhf_fast.encoding import Encoded, encode_example, encode_pair, format_prompt, pad_batch
from rlhf_fast.tokenizer import VOCAB_SIZE, byte_tokenizer


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- loaders
def test_loaders_round_trip(tmp_path):
    sft = [{"prompt": "2+2=", "response": "4"}, {"prompt": "", "response": "héllo"}]
    prefs = [{"prompt": "p", "chosen": "good", "rejected": "bad", "extra": 1}]
    write_jsonl(tmp_path / "sft.jsonl", sft)
    write_jsonl(tmp_path / "prefs.jsonl", prefs)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_sft(tmp_path / "sft.jsonl") == sft
    assert load_preferences(tmp_path / "prefs.jsonl") == [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    assert load_prompts(tmp_path / "prompts.jsonl") == ["a", "b"]


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "x", "response": ', "invalid JSON"),
    ('{"prompt": "x"}', "missing key 'response'"),
    ('{"prompt": "x", "response": 3}', "'response' must be a string"),
    ('{"prompt": "x", "response": ""}', "'response' is empty"),
    ('["x", "y"]', "expected a JSON object"),
    ("", "blank line"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "a", "response": "b"})
    path = write_lines(tmp_path / "sft.jsonl", [good, good, bad_line, good])
    with pytest.raises(DataError) as e:
        load_sft(path)
    assert f"{path}:3" in str(e.value) and message in str(e.value)


def test_preference_errors(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "a", "chosen": "x", "rejected": "x"})])
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'chosen' and 'rejected' are identical"):
        load_preferences(path)
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"prompt": "a", "chosen": "x"})])
    with pytest.raises(DataError, match=r"q\.jsonl:1: missing key 'rejected'"):
        load_preferences(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty dataset"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_sft(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------- tokenizer
def test_byte_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = byte_tokenizer()
    assert len(tok) == VOCAB_SIZE == 259
    text = "sort 5281: héllo ✓\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.encode("utf-8"))
    assert ids[1] == 3 + ord("s")
    assert tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


# ---------------------------------------------------------------------------- encoding
def test_encode_pair_without_template():
    tok = byte_tokenizer()
    p, r = encode_pair(tok, "ab", "cd")
    assert p == [tok.bos_token_id, 3 + ord("a"), 3 + ord("b")]
    assert r == [3 + ord("c"), 3 + ord("d"), tok.eos_token_id]
    assert format_prompt(tok, "ab") == "ab"


def test_encode_pair_with_chat_template():
    tok = byte_tokenizer(add_bos=False)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert format_prompt(tok, "hi") == "<user>hi</s><assistant>"
    p, r = encode_pair(tok, "hi", "yo")
    assert tok.decode(p) == "<user>hi</s><assistant>"
    assert tok.decode(r) == "yo</s>"  # the template's end of turn, not an added EOS


def test_encode_example_cuts_the_response_never_the_prompt():
    tok = byte_tokenizer()
    e = encode_example(tok, "abc", "defgh", max_length=6)
    assert e.n_prompt == 4 and len(e.ids) == 6 and tok.decode(e.ids[4:]) == "de"
    with pytest.raises(DataError, match="max_length=4"):
        encode_example(tok, "abc", "d", max_length=4)


def test_pad_batch_masks():
    b = pad_batch([Encoded([1, 5, 6, 7], 2), Encoded([1, 8], 1)], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["response_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert b["last"].tolist() == [3, 1]


def test_policy_prompt_encodes_like_sft():
    """The RL trainers encode prompts with tokenizer(text); that must give the SFT prompt ids,
    also for a template that writes the BOS itself (no second BOS)."""
    from rlhf_fast.encoding import encode_prompt, policy_prompt

    plain = byte_tokenizer()
    assert plain(policy_prompt(plain, "ab"))["input_ids"] == encode_prompt(plain, "ab")
    tok = byte_tokenizer()  # adds BOS
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    want = encode_prompt(tok, "hi")
    assert want[0] == tok.bos_token_id and want.count(tok.bos_token_id) == 1
    assert tok(policy_prompt(tok, "hi"))["input_ids"] == want
    no_bos = byte_tokenizer(add_bos=False)
    no_bos.chat_template = tok.chat_template
    assert no_bos(policy_prompt(no_bos, "hi"))["input_ids"] == encode_prompt(no_bos, "hi") == want
