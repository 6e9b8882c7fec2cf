"""RL with verifiable rewards: GRPO on a small arithmetic dataset this script writes.

    python examples/rlvr_arithmetic.py                  # CPU, about 30 s
    python examples/rlvr_arithmetic.py --quick          # the CI size
    python examples/rlvr_arithmetic.py --device cuda --hidden 512 --layers 8 --steps 200

The dataset: prompts "a+b=" (a, b < ``--max-operand``) with their sum in an ``answer`` column,
which reaches the reward functions as a keyword argument (TRL's convention):

    reward_fn = [math_answer, boxed_format]      # rlhf_fast.rewards: \\boxed{} / last-number answer vs
    reward_weights = [1.0, 0.1]                  #   the answer column, and a format reward

The policy is a tiny Llama built from its config (no download) over the built-in byte tokenizer.
A short SFT warm-up on part of the problems teaches it the answer format (``\\boxed{n}``) and
some sums; GRPO then raises the greedy accuracy on every problem, including the held-out ones.
Prints the greedy accuracy before and after GRPO and the per-function reward means.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from rlhf_fast.rewards import boxed_format, math_answer
from rlhf_fast.tokenizer import byte_tokenizer
from rlhf_fast.trainer.config import GRPOConfig
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False)


def problems(max_operand: int) -> list[dict]:
    """Every "a+b=" with a, b < max_operand, its sum as the ``answer`` column."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(max_operand) for b in range(max_operand)]


def tiny_policy(tok, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 32, 1), max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def greedy_accuracy(model, tok, rows, device) -> float:
    """Fraction of ``rows`` whose greedy completion's answer equals the ``answer`` column."""
    from rlhf_fast.trainer.rollout import left_pad

    model.eval()
    ids, mask = left_pad([tok(r["prompt"])["input_ids"] for r in rows], tok.pad_token_id, device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    texts = tok.batch_decode(out, skip_special_tokens=True)
    model.train()
    scores = math_answer(None, texts, answer=[r["answer"] for r in rows])
    return sum(scores) / len(scores)


def run(*, steps=40, sft_steps=80, max_operand=4, hidden=64, layers=2, seed=0, device="cpu", out=None,
        group_size=8, rollout_batch_size=16, learning_rate=1e-3) -> dict:
    """SFT warm-up, then GRPO with math_answer + boxed_format; returns the accuracies and metrics."""
    out = Path(out or tempfile.mkdtemp(prefix="rlvr_"))
    rows = problems(max_operand)
    rng = random.Random(seed)
    warm = rng.sample(rows, len(rows) // 2)  # the SFT warm-up sees half the problems
    tok = byte_tokenizer()
    model = tiny_policy(tok, hidden, layers, seed)

    sft = [{"prompt": r["prompt"], "response": f"\\boxed{{{r['answer']}}}"} for r in warm]
    SFTTrainer(SFTConfig(output_dir=str(out / "sft"), max_steps=sft_steps, batch_size=16, micro_batch_size=16,
                         learning_rate=3e-3, warmup_steps=5, device=device, seed=seed, **QUIET),
               model=model, tokenizer=tok, train_data=sft).train()
    before = greedy_accuracy(model, tok, rows, device)

    cfg = GRPOConfig(output_dir=str(out / "grpo"), total_steps=steps, rollout_batch_size=rollout_batch_size,
                     group_size=group_size, mini_batch_size=rollout_batch_size * group_size // 2,
                     micro_batch_size=rollout_batch_size * group_size // 2, max_new_tokens=12,
                     learning_rate=learning_rate,
                     beta=0.0, temperature=1.0, max_prompt_length=16, reward_weights=[1.0, 0.1], device=device,
                     seed=seed, **QUIET)
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, prompts=rows, reward_fn=[math_answer, boxed_format])
    trainer.train()
    after = greedy_accuracy(trainer.model.policy, tok, rows, device)
    log = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy_before": before, "accuracy_after": after, "metrics": log, "output_dir": str(out)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the CI size")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--sft-steps", type=int, default=80)
    p.add_argument("--max-operand", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="output folder (default: a temporary one)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps = min(a.steps, 30)
    res = run(steps=a.steps, sft_steps=a.sft_steps, max_operand=a.max_operand, hidden=a.hidden, layers=a.layers,
              seed=a.seed, device=a.device, out=a.out)
    first, last = res["metrics"][0], res["metrics"][-1]
    print(f"greedy accuracy: {res['accuracy_before']:.3f} -> {res['accuracy_after']:.3f} "
          f"({len(problems(a.max_operand))} problems)")
    acc = [m["reward/math_answer/mean"] for m in res["metrics"]]
    print(f"reward/math_answer/mean (sampled): {sum(acc[:5]) / 5:.3f} (steps 1-5) -> {sum(acc[-5:]) / 5:.3f} "
          f"(last 5 of {len(acc)}); tokens/s {first['perf/tokens_per_s']:.0f} (step 1) "
          f"{last['perf/tokens_per_s']:.0f} (step {len(acc)})")
    return res


if __name__ == "__main__":
    main()
