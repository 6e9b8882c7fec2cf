"""The rest of the RLHF family in the demo (``rlhf-fast demo --family``), beside PPO and GRPO:

    Best-of-N   no training: N samples of the SFT policy per held-out prompt, the reward model
                picks one. Its KL to SFT is the analytic value log N - (N - 1) / N (Stiennon et
                al. 2020; an upper bound, Beirami et al. 2024), not a sampled estimate.
    DPO         the SFT policy trained on the same noisy preference pairs as the reward model,
                no reward model and no RL                                   -> OUT/dpo/final
    RLOO        against the reward model, leave-one-out baseline, KL in the reward -> OUT/rloo/final
    RLAIF       RLOO with no human preference labels at all: the reward is an AI judge's verdict,
                the frozen SFT model read as ``log p(EOS | prompt + completion)`` ("the answer is
                complete here", ``trainer.judge.Judge`` with the EOS token as the verdict). It
                knows only the careless demonstrations; whether that is a useful signal is what
                the table shows                                              -> OUT/rlaif/final

Each is measured like the others (gold, exactly sorted, proxy, KL to SFT, distinct-2, wall
time) and stands in OUT/frontier.png (``demo_report.frontier_plot``: gold reward against KL for
every method, the over-optimisation frontier).
"""
from __future__ import annotations

import math
import time

import torch

from rlhf_fast.data import load_preferences
from rlhf_fast.demo_task import gold_rewards, ideal
from rlhf_fast.trainer.best_of_n import sample_n
from rlhf_fast.trainer.dpo import DPOConfig, DPOTrainer
from rlhf_fast.trainer.health import distinct_n
from rlhf_fast.trainer.judge import Judge

FAMILY_FOLDERS = ("best_of_n", "dpo", "rloo", "rlaif")


def run_family(demo) -> None:
    """Best-of-N, DPO, RLOO and RLAIF on ``demo`` (a ``rlhf_fast.demo.Demo`` whose SFT, reward
    model and SFT results exist); fills ``demo.results`` and ``demo.timings``."""
    demo.timed("best_of_n", lambda: best_of_n_stage(demo))
    demo.timed("dpo", lambda: dpo_stage(demo))
    demo.timed("rloo", lambda: demo.rl("RLOO", kl=demo.cfg.rloo_beta, steps=demo.cfg.rl_steps))
    judge = sft_judge(demo)
    demo.timed("rlaif", lambda: demo.rl("RLOO", kl=demo.cfg.rloo_beta, steps=demo.cfg.rl_steps, name="RLAIF",
                                        folder="rlaif", reward={"reward_fn": judge}))


@torch.no_grad()
def best_of_n_stage(demo) -> None:
    c, tok = demo.cfg, demo.tokenizer
    n = c.bon_n
    demo.log(f"\n[+] Best-of-{n}: {n} SFT samples per held-out prompt, the reward model picks one")
    t = time.perf_counter()
    prompts = [p for p in demo.eval_prompts for _ in range(c.eval_samples)]
    sft = demo.sft_policy().eval()

    res = sample_n(sft, tok, prompts, n, max_new_tokens=c.max_new_tokens, device=demo.device, reward_model=demo.rm,
                   batch_size=256, seed=c.seed + 4242, max_prompt_length=64)
    best = [r["best"] for r in res]
    gold = gold_rewards(prompts, best)
    ids = [list(tok(b, add_special_tokens=False)["input_ids"]) for b in best]
    demo.results[f"Best-of-{n}"] = {
        "gold": sum(gold) / len(gold), "proxy": sum(r["best_score"] for r in res) / len(res),
        "kl": math.log(n) - (n - 1) / n, "exact": sum(b == ideal(p) for p, b in zip(prompts, best)) / len(best),
        "distinct_2": distinct_n(ids, 2), "kl_note": "analytic log N - (N-1)/N",
        "examples": [[p, b] for p, b in zip(prompts[:: c.eval_samples][:4], best[:: c.eval_samples][:4])]}
    r = demo.results[f"Best-of-{n}"]
    demo.log(f"      held-out gold {r['gold']:.3f}, proxy {r['proxy']:+.3f} ({time.perf_counter() - t:.0f}s)")


def dpo_stage(demo) -> None:
    c, d = demo.cfg, demo.out / "data"
    demo.log(f"\n[+] DPO on the {c.n_pairs} preference pairs (no reward model, no RL), beta={c.dpo_beta:g}")
    cfg = DPOConfig(**demo.common("dpo"), max_steps=c.dpo_steps, batch_size=c.rm_batch_size,
                    micro_batch_size=c.rm_batch_size, learning_rate=c.dpo_lr, beta=c.dpo_beta, warmup_steps=10,
                    eval_batch_size=128)
    trainer = DPOTrainer(cfg, model=demo.sft_policy(), tokenizer=demo.tokenizer,
                         train_data=load_preferences(d / "preferences.jsonl"),
                         eval_data=load_preferences(d / "preferences_eval.jsonl"))
    out = trainer.train()
    demo.results["DPO"] = demo.evaluate(trainer.model, "DPO")
    r = demo.results["DPO"]
    demo.log(f"      held-out pair accuracy (implicit reward) {out['eval/rewards/accuracy']:.3f}; "
             f"gold {r['gold']:.3f}, "
             f"proxy {r['proxy']:+.3f}, KL to SFT {r['kl']:.2f} -> {demo.out / 'dpo' / 'final'}")


def sft_judge(demo) -> Judge:
    """The RLAIF judge: the frozen SFT model, verdict = its EOS token after the completion."""
    tok = demo.tokenizer
    return Judge(demo.ref, tok, template="{prompt}{completion}", verdict=tok.eos_token, contrast=None,
                 batch_size=256, max_length=64, device=demo.device)
