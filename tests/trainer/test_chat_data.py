"""Chat data on a real BPE tokenizer with a ChatML template: responses end at their stop token
(the template's suffix is never part of one), multi-turn conversations train the assistant
turns only (switchable), conversational preferences and prompt rows with columns, datasets
folders and parquet files as input, and the warnings / errors for data a run cannot use."""
import json

import pytest
from chat_utils import EOT, EOT_TEXT, chatml_tokenizer, tiny_lm

from rlhf_fast.data import DataError, load_preferences, load_prompt_rows, load_sft, write_jsonl
from rlhf_fast.encoding import encode_conversation, encode_example, encode_pair, policy_prompt
from rlhf_fast.stops import end_of_turn_token, stop_token_ids, tokenizer_mismatch
from rlhf_fast.tokenizer import byte_tokenizer
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say apple"},
        {"role": "assistant", "content": "apple"}, {"role": "user", "content": "say river"},
        {"role": "assistant", "content": "river"}]


@pytest.fixture(params=[EOT, EOT_TEXT], ids=["eos_is_eot", "eos_not_eot"])
def tok(request):
    return chatml_tokenizer(request.param)


def test_stop_tokens(tok):
    eot = tok.convert_tokens_to_ids(EOT)
    assert end_of_turn_token(tok) == EOT
    assert stop_token_ids(tok) == sorted({eot, tok.eos_token_id})
    lm = tiny_lm(tok)
    lm.generation_config.eos_token_id = [eot, 7]  # a model's generation_config adds its EOS ids
    assert stop_token_ids(tok, lm) == sorted({eot, 7, tok.eos_token_id})
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert stop_token_ids(tok, None, "<|im_start|>") == sorted({tok.eos_token_id, start})
    with pytest.raises(ValueError, match="stop_tokens: 'nope' is not a token"):
        stop_token_ids(tok, None, "nope")
    assert end_of_turn_token(byte_tokenizer()) is None  # no template


def test_response_ends_at_the_stop_token_without_the_template_suffix(tok):
    eot = tok.convert_tokens_to_ids(EOT)
    p, r = encode_pair(tok, "say apple", "apple pie")
    assert r[-1] == eot and r.count(eot) == 1  # the template's "\n" after <|im_end|> is not in the response
    assert tok.decode(r, skip_special_tokens=True) == "apple pie"
    assert tok(policy_prompt(tok, "say apple"))["input_ids"] == p  # the ids a rollout's prompt has
    # conversational prompt + assistant messages: the same tokens
    p2, r2 = encode_pair(tok, [{"role": "user", "content": "say apple"}],
                         [{"role": "assistant", "content": "apple pie"}])
    assert (p2, r2) == (p, r)


def test_multi_turn_trains_assistant_turns_only(tok):
    eot = tok.convert_tokens_to_ids(EOT)
    e = encode_conversation(tok, CONV, 200)
    trained = [t for t, m in zip(e.ids, e.loss_mask) if m]
    assert tok.decode(trained) == f"apple{EOT}river{EOT}"
    assert trained.count(eot) == 2 and e.ids.count(eot) == 5  # every turn ends with it; two are trained
    assert tok.decode(e.ids) == tok.apply_chat_template(CONV, tokenize=False)  # nothing lost or added
    full = encode_conversation(tok, CONV, 200, assistant_only=False)
    assert all(full.loss_mask) and full.ids == e.ids
    first = e.loss_mask.index(True)
    short = encode_conversation(tok, CONV, first + 2)  # cut inside the first assistant turn
    assert short.ids == e.ids[: first + 2] and sum(short.loss_mask) == 2
    with pytest.raises(DataError, match="no assistant token fits"):
        encode_conversation(tok, CONV, first)


def test_sft_trainer_on_messages_and_strings(tmp_path, tok):
    data = [{"messages": CONV}, {"prompt": "say stone", "response": "stone"}]
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, micro_batch_size=1, **QUIET)
    tr = SFTTrainer(cfg, model=tiny_lm(tok), tokenizer=tok, train_data=data)
    n = lambda text: len(tok(text)["input_ids"])  # noqa: E731
    assert [tr.weight(it) for it in tr.train_set] == [n("apple") + n("river") + 2, n("stone") + 1]
    assert tr.train()["train/loss"] > 0


def test_warning_when_sft_responses_never_stop(tmp_path, tok):
    data = [{"prompt": "say stone", "response": "stone " * 20}, {"prompt": "say stone", "response": "stone"}]
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, micro_batch_size=2, max_length=30, **QUIET)
    with pytest.warns(UserWarning, match=r"1 of 2 SFT training responses contain no stop token .*max_length=30"):
        SFTTrainer(cfg, model=tiny_lm(tok), tokenizer=tok, train_data=data)


def test_conversational_data_needs_a_chat_template(tmp_path):
    tok = byte_tokenizer()
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=1, batch_size=1, micro_batch_size=1, **QUIET)
    from rlhf_fast.models import tiny_causal_lm

    with pytest.raises(DataError, match=r"train_data\[0\]: conversational data needs a tokenizer with a chat template"):
        SFTTrainer(cfg, model=tiny_causal_lm(tok), tokenizer=tok, train_data=[{"messages": CONV}])
    with pytest.raises(DataError, match="a conversational prompt needs a tokenizer with a chat template"):
        policy_prompt(tok, CONV[:2])


def test_loaders_for_chat_rows(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONV}, {"prompt": "a", "response": "b"}])
    assert load_sft(tmp_path / "sft.jsonl") == [{"messages": CONV}, {"prompt": "a", "response": "b"}]
    pref = {"prompt": CONV[:2], "chosen": [{"role": "assistant", "content": "apple"}],
            "rejected": [{"role": "assistant", "content": "pear"}]}
    write_jsonl(tmp_path / "prefs.jsonl", [pref])
    assert load_preferences(tmp_path / "prefs.jsonl") == [pref]
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2", "id": 7}, {"prompt": CONV[:2]}])
    assert load_prompt_rows(tmp_path / "prompts.jsonl")[0] == {"prompt": "1+1=", "answer": "2", "id": 7}


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "holds no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\] must be a message"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
])
def test_bad_messages_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"sft\.jsonl:2: .*{message}"):
        load_sft(path)


def test_bad_conversational_preference(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": CONV[:2], "chosen": [{"role": "user", "content": "x"}],
                                "rejected": [{"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'chosen' must end with an assistant message"):
        load_preferences(path)


def test_datasets_folder_and_parquet(tmp_path):
    import datasets

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    for src in ("folder", "dict", "rows.parquet"):
        assert load_prompt_rows(tmp_path / src) == rows
    bad = datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet row 1: 'response' is empty"):
        load_sft(tmp_path / "bad.parquet")


def test_reward_model_tokenizer_mismatch(tok):
    from rlhf_fast.trainer.hf_io import distinct_pad

    same = distinct_pad(tiny_lm(tok), tok, [tok.pad_token_id])  # adds a pad: not a difference
    assert tokenizer_mismatch(tok, same) is None
    other = chatml_tokenizer(tok.eos_token)
    other.chat_template = other.chat_template.replace("\n", " ")
    assert tokenizer_mismatch(tok, other) == "chat templates differ"
    assert "vocabularies differ" in tokenizer_mismatch(tok, byte_tokenizer())


def test_rm_pairs_end_where_rollouts_end(tok):
    eot = tok.convert_tokens_to_ids(EOT)
    for response in ("apple", [{"role": "assistant", "content": "apple"}]):
        prompt = "say apple" if isinstance(response, str) else [{"role": "user", "content": "say apple"}]
        e = encode_example(tok, prompt, response, 64)
        assert e.ids[-1] == eot


def test_cli_warns_when_the_reward_models_tokenizer_differs(tmp_path):
    from rlhf_fast.cli import main

    rm = tmp_path / "rm"
    tok = chatml_tokenizer()
    tiny_lm(tok).save_pretrained(rm)
    tok.save_pretrained(rm)
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ab"}, {"prompt": "cd"}])
    argv = ["grpo", "--model", "tiny", "--set", f"prompts_file={tmp_path / 'p.jsonl'}", "--set", f"reward_model={rm}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "total_steps=1", "--set", "rollout_batch_size=2",
            "--set", "group_size=2", "--set", "mini_batch_size=4", "--set", "micro_batch_size=2",
            "--set", "max_new_tokens=3", "--set", "device=cpu"]
    argv += [x for k in ("progress_bar", "tensorboard", "plot") for x in ("--set", f"{k}=false")]
    with pytest.warns(UserWarning, match=r"trained with another tokenizer than the policy's \(vocabularies differ"):
        assert main(argv) == 0
