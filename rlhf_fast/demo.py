"""The whole RLHF story on a laptop CPU in minutes, with no downloads: ``rlhf-fast demo``.

    data     the sort-the-digits task (rlhf_fast.demo_task): careless demonstrations, noisy
             preference pairs, prompts; written to OUT/data/*.jsonl and read back with the loaders
    model    a tiny Llama built from a config, the built-in byte-level tokenizer
    1. SFT   on the demonstrations                                   -> OUT/sft/final
    2. RM    Bradley-Terry on the pairs, trunk initialised from SFT  -> OUT/rm/final
    3. PPO   against the RM, KL leash (kl_coef) to the SFT policy    -> OUT/ppo/final
    4. GRPO  against the RM, KL leash (beta) to the SFT policy       -> OUT/grpo/final
    (+)      with no_kl_leash: PPO and GRPO again with the leash off -> OUT/ppo_no_kl, OUT/grpo_no_kl
    (+)      with family (``demo --family``): best-of-N, DPO, RLOO and RLAIF (demo_family.py)

Every policy is measured on held-out prompts with the programmatic gold reward (the truth),
the reward model's score (the proxy that RL optimises) and its KL to the SFT policy (sum over
the completion of log pi - log pi_sft on its own samples) and distinct-2 of its samples (mode
collapse). RL runs are measured every ``eval_every`` steps too: OUT/heldout.jsonl and
OUT/heldout.png; OUT/frontier.png plots gold reward against KL for every method. OUT/summary.md
holds the table (with each method's wall time). This file runs the stages; the measuring, the
verdicts, the table and the plots are ``demo_report.py``'s.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.data import load_preferences, load_prompts, load_sft, write_jsonl
from rlhf_fast.demo_report import evaluate_policy, frontier_plot, heldout_plot, summary_table, verdicts
from rlhf_fast.demo_task import SEP, SortTask
from rlhf_fast.tokenizer import VOCAB_SIZE, byte_tokenizer
from rlhf_fast.trainer.config import ConfigError, GRPOConfig, PPOConfig, check_field, check_types
from rlhf_fast.trainer.grpo import GRPOTrainer
from rlhf_fast.trainer.ppo import PPOTrainer
from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer, reward_model_from_pretrained
from rlhf_fast.trainer.runtime import resolve_device
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

POSITIONS = 64  # max_position_embeddings of the demo's tiny Llama
OUTPUTS = ("summary.json", "heldout.jsonl", "sft", "rm", "ppo", "grpo")  # a demo run's mark on its output_dir


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of the demo (``rlhf-fast demo --set key=value``)."""

    output_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"
    threads: int = 1  # torch CPU threads: for a model this small one thread is fastest
    no_kl_leash: bool = False  # also run PPO / GRPO with kl_coef = beta = 0 (reward over-optimisation)
    progress_bar: bool = True
    overwrite_output_dir: bool = False  # replace the demo already in output_dir
    # task and data
    p_clean: float = 0.3
    label_noise: float = 0.1
    n_sft: int = 4000
    n_pairs: int = 4000
    n_eval_pairs: int = 500
    n_prompts: int = 2000
    n_eval_prompts: int = 200
    eval_samples: int = 2  # completions per held-out prompt
    # model
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    # stages
    sft_steps: int = 800
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    rm_steps: int = 600
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    rl_steps: int = 100
    no_kl_steps: int = 200  # the runs without the leash go on longer: the drift is what accumulates
    eval_every: int = 20
    max_new_tokens: int = 12
    ppo_lr: float = 2e-4
    ppo_rollout_batch_size: int = 64
    kl_coef: float = 0.2
    grpo_lr: float = 5e-4
    grpo_prompts: int = 16
    group_size: int = 4
    beta: float = 0.2
    # the family (``demo --family``): best-of-N, DPO, RLOO, RLAIF
    family: bool = False
    bon_n: int = 8  # best-of-N samples per prompt
    dpo_steps: int = 150
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.3  # at 3e-4 and beta 0.1 DPO ran off (KL 12, gold 0.61 at the quick size)
    rloo_beta: float = 0.05  # RLOO / RLAIF: coefficient of the sequence KL in the reward

    def __post_init__(self):
        check_types(self)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and f.name not in ("seed", "kl_coef", "beta",
                                                                                          "rloo_beta"):
                check_field(self, f.name, v > 0 or f.name in ("p_clean", "label_noise"), "must be > 0")
        for name in ("kl_coef", "beta", "rloo_beta"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        SortTask(p_clean=self.p_clean, label_noise=self.label_noise)  # range checks

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A reduced size (about a minute on one core) for tests and a first look."""
        small = dict(n_sft=2000, n_pairs=2000, n_eval_pairs=300, n_prompts=1000, n_eval_prompts=100,
                     sft_steps=500, rm_steps=400, rl_steps=30, no_kl_steps=60, eval_every=15)
        return cls(**{**small, **overrides})


# ---------------------------------------------------------------------------- evaluation hook
def with_heldout_eval(trainer_class, callback, every: int):
    """``trainer_class`` whose runs call ``callback(trainer)`` after every ``every``-th step."""

    class Evaluated(trainer_class):
        def maybe_save(self):
            super().maybe_save()
            if self.step % every == 0 or self.step == self.config.total_steps:
                callback(self)

    Evaluated.__name__ = trainer_class.__name__
    return Evaluated


# ---------------------------------------------------------------------------- the pipeline
class Demo:
    """Runs the stages in order; ``run()`` returns the summary dict (also OUT/summary.json)."""

    def __init__(self, config: DemoConfig, log=print):
        self.cfg = config
        self.out = Path(config.output_dir)
        self.log = log
        self.device = resolve_device(config.device)
        self.task = SortTask(p_clean=config.p_clean, label_noise=config.label_noise)
        self.tokenizer = byte_tokenizer()
        self.results: dict = {}
        self.curves: list[dict] = []
        self.timings: dict = {}

    def run(self) -> dict:
        cfg = self.cfg
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        used = demo_outputs(self.out)
        if used and not cfg.overwrite_output_dir:
            raise FileExistsError(f"output_dir {self.out} already holds a demo run ({', '.join(used)}); "
                                  "set overwrite_output_dir=true to replace it, or choose another output_dir")
        self.check_settings()
        (self.out / "heldout.jsonl").unlink(missing_ok=True)
        try:
            self.make_data()
            self.timed("sft", self.sft)
            self.timed("rm", self.reward_model)
            self.load_judges()
            self.results["SFT"] = self.evaluate(self.sft_policy(), "SFT")
            for algo, kl, steps in self.rl_stages():
                self.timed(algo.lower() + ("" if kl > 0 else "_no_kl"), lambda: self.rl(algo, kl=kl, steps=steps))
            if cfg.family:
                from rlhf_fast.demo_family import run_family

                run_family(self)
        finally:
            torch.set_num_threads(threads)
        self.timings["total"] = time.perf_counter() - t0
        return self.finish()

    def check_settings(self) -> None:
        """Every stage's settings before any stage runs (the CLI calls it before it writes
        anything): the RL configs (RLOO's with ``family``) and the tiny model's positions."""
        c = self.cfg
        for stage in self.rl_stages() + ([("RLOO", c.rloo_beta, c.rl_steps)] if c.family else []):
            self.rl_config(*stage)
        longest = len(self.tokenizer("9" * self.task.max_digits + SEP)["input_ids"])
        if longest + c.max_new_tokens > POSITIONS:
            raise ConfigError(f"DemoConfig.max_new_tokens={c.max_new_tokens}: the longest prompt ({longest} tokens) + "
                              f"max_new_tokens exceeds the demo model's {POSITIONS} positions")

    def timed(self, name, fn):
        t = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t

    # ------------------------------------------------------------------ data
    def make_data(self):
        cfg, task, d = self.cfg, self.task, self.out / "data"
        s = cfg.seed * 100
        write_jsonl(d / "sft.jsonl", task.sft_data(cfg.n_sft, s + 1))
        write_jsonl(d / "sft_eval.jsonl", task.sft_data(max(cfg.n_sft // 20, 1), s + 2))
        write_jsonl(d / "preferences.jsonl", task.preference_data(cfg.n_pairs, s + 3))
        # held-out pairs are labelled by the gold reward without noise: accuracy against the truth
        write_jsonl(d / "preferences_eval.jsonl", task.preference_data(cfg.n_eval_pairs, s + 4, noisy=False))
        write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in task.prompts(cfg.n_prompts, s + 5)])
        write_jsonl(d / "prompts_eval.jsonl", [{"prompt": p} for p in task.prompts(cfg.n_eval_prompts, s + 6)])
        self.eval_prompts = load_prompts(d / "prompts_eval.jsonl")
        self.log(f"data: {cfg.n_sft} demonstrations ({cfg.p_clean:.0%} exactly right), {cfg.n_pairs} preference "
                 f"pairs ({cfg.label_noise:.0%} labels flipped), {cfg.n_prompts} RL prompts -> {d}")

    # ------------------------------------------------------------------ stages
    def base_model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg, tok = self.cfg, self.tokenizer
        mcfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=cfg.hidden_size, intermediate_size=4 * cfg.hidden_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=cfg.num_heads, max_position_embeddings=POSITIONS, tie_word_embeddings=True,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(self.cfg.seed)
        return LlamaForCausalLM(mcfg)

    def common(self, name):
        c = self.cfg
        return dict(output_dir=str(self.out / name), seed=c.seed, device=c.device, progress_bar=c.progress_bar,
                    tensorboard=False, overwrite_output_dir=c.overwrite_output_dir)

    def sft(self):
        c, d = self.cfg, self.out / "data"
        model = self.base_model()
        n_params = sum(p.numel() for p in model.parameters())
        self.log(f"\n[1/4] SFT: tiny Llama ({n_params / 1e3:.0f}k parameters), byte-level tokenizer")
        trainer = SFTTrainer(SFTConfig(**self.common("sft"), max_steps=c.sft_steps, batch_size=c.sft_batch_size,
                                       micro_batch_size=c.sft_batch_size, learning_rate=c.sft_lr, warmup_steps=20),
                             model=model, tokenizer=self.tokenizer, train_data=load_sft(d / "sft.jsonl"),
                             eval_data=load_sft(d / "sft_eval.jsonl"))
        res = trainer.train()
        self.log(f"      held-out response NLL {res['eval/loss']:.3f} -> {self.out / 'sft' / 'final'}")

    def reward_model(self):
        c, d = self.cfg, self.out / "data"
        self.log("\n[2/4] Reward model: Bradley-Terry on preference pairs, trunk initialised from SFT")
        rm = reward_model_from_pretrained(self.out / "sft" / "final", pad_token_id=self.tokenizer.pad_token_id)
        trainer = RewardTrainer(RewardConfig(**self.common("rm"), max_steps=c.rm_steps, batch_size=c.rm_batch_size,
                                             micro_batch_size=c.rm_batch_size, learning_rate=c.rm_lr, warmup_steps=20),
                                model=rm, tokenizer=self.tokenizer, train_data=load_preferences(d / "preferences.jsonl"),
                                eval_data=load_preferences(d / "preferences_eval.jsonl"))
        res = trainer.train()
        self.results["RM"] = {"accuracy": res["eval/accuracy"]}
        self.log(f"      held-out pairwise accuracy {res['eval/accuracy']:.3f} -> {self.out / 'rm' / 'final'}")

    def load_judges(self):
        """The frozen reward model and SFT reference every policy is measured with."""
        self.rm = reward_model_from_pretrained(self.out / "rm" / "final").to(self.device).eval()
        self.ref = self.sft_policy().to(self.device).eval()

    def sft_policy(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.out / "sft" / "final").to(self.device)

    def evaluate(self, policy, name, step=None) -> dict:
        c = self.cfg
        res = evaluate_policy(policy, self.eval_prompts, tokenizer=self.tokenizer, reward_model=self.rm,
                              ref_model=self.ref, samples=c.eval_samples, max_new_tokens=c.max_new_tokens,
                              seed=c.seed + 12345, device=self.device)
        if step is not None:
            self.record(name, step, res)
        return res

    def record(self, run, step, res):
        """One point of the held-out curves (OUT/heldout.jsonl, OUT/heldout.png)."""
        rec = {"run": run, "step": step, **{k: v for k, v in res.items() if k != "examples"}}
        self.curves.append(rec)
        with open(self.out / "heldout.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def rl_config(self, algo: str, kl: float, steps: int):
        """(trainer class, config) of an RL stage (built before anything runs, so a bad setting
        fails at once)."""
        c = self.cfg
        folder = algo.lower() + ("" if kl > 0 else "_no_kl")
        common = dict(**self.common(folder), total_steps=steps, max_new_tokens=c.max_new_tokens,
                      missing_eos_penalty=1.0, max_prompt_length=64)
        if algo == "PPO":
            return PPOTrainer, PPOConfig(**common, learning_rate=c.ppo_lr, kl_coef=kl,
                                         rollout_batch_size=c.ppo_rollout_batch_size,
                                         mini_batch_size=c.ppo_rollout_batch_size // 2,
                                         micro_batch_size=c.ppo_rollout_batch_size // 2, ppo_epochs=2)
        n = c.grpo_prompts * c.group_size
        if algo == "RLOO":  # one mini-batch, one pass: on-policy REINFORCE (the paper's estimator)
            from rlhf_fast.trainer.rloo import RLOOConfig, RLOOTrainer

            return RLOOTrainer, RLOOConfig(**common, learning_rate=c.grpo_lr, beta=kl,
                                           rollout_batch_size=c.grpo_prompts, group_size=c.group_size,
                                           mini_batch_size=n, micro_batch_size=max(n // 2, 1))
        return GRPOTrainer, GRPOConfig(**common, learning_rate=c.grpo_lr, beta=kl, rollout_batch_size=c.grpo_prompts,
                                       group_size=c.group_size, mini_batch_size=max(n // 2, 1),
                                       micro_batch_size=max(n // 2, 1))

    def rl_stages(self) -> list:
        """(algo, kl, steps) of every RL stage this demo runs."""
        c = self.cfg
        stages = [("PPO", c.kl_coef, c.rl_steps), ("GRPO", c.beta, c.rl_steps)]
        if c.no_kl_leash:
            stages += [("PPO", 0.0, c.no_kl_steps), ("GRPO", 0.0, c.no_kl_steps)]
        return stages

    def rl(self, algo: str, kl: float, steps: int, name=None, folder=None, reward=None):
        d = self.out / "data"
        leash = kl > 0
        name = name or (f"{algo}" if leash else f"{algo} (no KL)")
        folder = folder or algo.lower() + ("" if leash else "_no_kl")
        what = (f"KL leash {'kl_coef' if algo == 'PPO' else 'beta'}={kl:g}" if leash else "KL leash OFF")
        against = "the reward model" if reward is None else "an AI judge"
        stage = {"PPO": "3/4", "GRPO": "4/4"}.get(algo, "+")
        self.log(f"\n[{stage}] {name} against {against}, {what}, {steps} steps")
        cls, config = self.rl_config(algo, kl, steps)
        config.output_dir = str(self.out / folder)
        c = self.cfg
        self.record(name, 0, self.results["SFT"])  # every run starts from the SFT policy
        trainer_class = with_heldout_eval(cls, lambda t: self.evaluate(t.model, name, t.step), c.eval_every)
        trainer = trainer_class(config, model=self.sft_policy(), ref_model=self.ref, tokenizer=self.tokenizer,
                                prompts=load_prompts(d / "prompts.jsonl"), **(reward or {"reward_model": self.rm}))
        trainer.train()
        self.results[name] = self.evaluate(trainer.model, name)
        r = self.results[name]
        self.log(f"      held-out gold {r['gold']:.3f}, proxy {r['proxy']:+.3f}, KL to SFT {r['kl']:.2f} "
                 f"-> {self.out / folder / 'final'}")

    # ------------------------------------------------------------------ report (demo_report.py)
    def finish(self) -> dict:
        """OUT/summary.json, OUT/summary.md, OUT/heldout.png and (once a method beside SFT has
        results) OUT/frontier.png; returns the summary."""
        summary = {"config": dataclasses.asdict(self.cfg), "results": self.results, "timings_s": self.timings,
                   "verdicts": verdicts(self.results, self.curves)}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        text = summary_table(self.cfg, self.results, self.curves, self.timings, self.device, self.out)
        (self.out / "summary.md").write_text(text + "\n")
        heldout_plot(self.curves, self.results["SFT"]["gold"], self.out / "heldout.png")
        if len(self.results) > 2:
            frontier_plot(self.results, self.curves, self.out / "frontier.png")
        self.log("\n" + text)
        return summary


def demo_outputs(out: Path) -> list[str]:
    """The names of ``OUTPUTS`` that ``out`` already holds (a demo ran there)."""
    return [n for n in OUTPUTS if (out / n).exists()]


def run_demo(config: DemoConfig | None = None, log=print) -> dict:
    """Runs the demo; returns the summary (results per policy, verdicts, timings)."""
    cfg = config or DemoConfig()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout.jsonl").unlink(missing_ok=True)
    return Demo(cfg, log=log).run()
