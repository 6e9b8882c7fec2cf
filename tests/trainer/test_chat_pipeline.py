"""SFT -> RM -> PPO and GRPO through the CLI on a real BPE tokenizer with a ChatML template, in
both variants (eos == end of turn, and eos = <|endoftext|> != end of turn): SFT learns to stop
at the end-of-turn token, the reward model scores at the token rollouts end with, completions
stop at end of turn, and the exported models stop there under vanilla ``generate``."""
import json

import pytest
import torch
from chat_utils import EOT, EOT_TEXT, chatml_tokenizer, say_task, tiny_lm

from rlhf_fast.cli import main
from rlhf_fast.data import write_jsonl
from rlhf_fast.encoding import encode_example, policy_prompt
from rlhf_fast.trainer.rollout import left_pad, reward_model_scores, sample_rollout

QUIET = ["--set", "progress_bar=false", "--set", "tensorboard=false", "--set", "plot=false", "--set", "device=cpu"]


def cli(*argv):
    assert main([str(a) for a in argv] + QUIET) == 0


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def rollout_layout_scores(rm, tok, rows, key):
    """Scores of ``prompt + rows[key]`` laid out as a rollout is: the prompt as the RL trainer
    encodes it (left-padded), the response as the policy would emit it (its text's tokens, then
    the end-of-turn token that stops sampling)."""
    eot = tok.convert_tokens_to_ids(EOT)
    prompts = [tok(policy_prompt(tok, r["prompt"]))["input_ids"] for r in rows]
    responses = [tok(r[key], add_special_tokens=False)["input_ids"] + [eot] for r in rows]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    R = max(len(r) for r in responses)
    resp = torch.full((len(rows), R), tok.pad_token_id)
    rmask = torch.zeros(len(rows), R, dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, : len(r)], rmask[i, : len(r)] = torch.tensor(r), 1
    return reward_model_scores(rm, torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1))


@pytest.mark.parametrize("eos", [EOT, EOT_TEXT], ids=["eos_is_eot", "eos_not_eot"])
def test_sft_rm_grpo_ppo_stop_at_end_of_turn(tmp_path, eos):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = chatml_tokenizer(eos)
    eot = tok.convert_tokens_to_ids(EOT)
    base = tmp_path / "base"
    tiny_lm(tok).save_pretrained(base)
    tok.save_pretrained(base)
    sft, prefs, prompts = say_task(160, seed=1)
    _, held_out, _ = say_task(48, seed=2)
    write_jsonl(tmp_path / "sft.jsonl", sft)
    write_jsonl(tmp_path / "prefs.jsonl", prefs)
    write_jsonl(tmp_path / "held_out.jsonl", held_out)
    write_jsonl(tmp_path / "prompts.jsonl", prompts[:16])

    cli("sft", "--model", base, "--set", f"train_file={tmp_path / 'sft.jsonl'}", "--set", "max_steps=60",
        "--set", "batch_size=16", "--set", "learning_rate=5e-3", "--set", "warmup_steps=5",
        "--set", f"output_dir={tmp_path / 'sft'}")
    sft_dir = tmp_path / "sft" / "final"
    gen = json.loads((sft_dir / "generation_config.json").read_text())
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eot in stops and tok.eos_token_id in stops

    # vanilla generate on the export stops at end of turn
    lm = AutoModelForCausalLM.from_pretrained(sft_dir)
    ids = torch.tensor([tok(policy_prompt(tok, "say river"))["input_ids"]])
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)[0, ids.shape[1]:]
    assert out.tolist().count(eot) == 1 and out[-1].item() == eot, tok.convert_ids_to_tokens(out)
    # sampled rollouts (temperature 1) stop at end of turn too
    torch.manual_seed(0)
    texts = [policy_prompt(tok, p["prompt"]) for p in held_out[:16]]
    ro = sample_rollout(lm, tok, texts, [tok(t)["input_ids"] for t in texts], max_new_tokens=12, temperature=1.0,
                        device="cpu", reward_fn=lambda p, c: [0.0] * len(c), stop_ids=stops)
    last = ro.responses.gather(1, (ro.response_mask.sum(1, keepdim=True) - 1))[:, 0]
    assert ro.has_eos.float().mean() > 0.9 and (last[ro.has_eos] == eot).all(), tok.batch_decode(ro.responses)

    cli("rm", "--model", sft_dir, "--set", f"train_file={tmp_path / 'prefs.jsonl'}",
        "--set", f"eval_file={tmp_path / 'held_out.jsonl'}", "--set", "max_steps=40", "--set", "batch_size=16",
        "--set", "learning_rate=3e-3", "--set", f"output_dir={tmp_path / 'rm'}")
    rm_dir = tmp_path / "rm" / "final"
    acc_train_pos = metrics(tmp_path / "rm")[-1]["eval/accuracy"]
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    assert rm.config.pad_token_id == rm_tok.pad_token_id not in stops
    # the trained sequences end at the end-of-turn token, the one rollouts end with
    e = encode_example(rm_tok, held_out[0]["prompt"], held_out[0]["chosen"], 64)
    assert e.ids[-1] == eot
    chosen = rollout_layout_scores(rm, tok, held_out, "chosen")
    rejected = rollout_layout_scores(rm, tok, held_out, "rejected")
    acc_rollout_pos = (chosen > rejected).float().mean().item()
    assert acc_train_pos > 0.75
    assert abs(acc_rollout_pos - acc_train_pos) <= 0.05, (acc_rollout_pos, acc_train_pos)

    common = ["--model", sft_dir, "--set", f"prompts_file={tmp_path / 'prompts.jsonl'}", "--set",
              f"reward_model={rm_dir}", "--set", "total_steps=2", "--set", "max_new_tokens=12",
              "--set", "rollout_batch_size=8", "--set", "mini_batch_size=8", "--set", "learning_rate=1e-4"]
    cli("grpo", *common, "--set", "group_size=2", "--set", "mini_batch_size=16", "--set", "micro_batch_size=8",
        "--set", f"output_dir={tmp_path / 'grpo'}")
    cli("ppo", *common, "--set", "ppo_epochs=1", "--set", f"output_dir={tmp_path / 'ppo'}")
    for stage in ("grpo", "ppo"):
        first = metrics(tmp_path / stage)[0]
        assert first["response/eos_frac"] > 0.9, (stage, first)
        assert first["response/length"] < 8, (stage, first)
        gen = json.loads((tmp_path / stage / "final" / "generation_config.json").read_text())
        assert eot in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
