"""Trainer configs: flat dataclasses of simple types (str / int / float / bool / None), checked
in ``__post_init__`` with errors that name the field, so YAML files and ``--set key=value``
overrides map onto them one to one (``PPOConfig.from_dict``).

Units: a *step* is one rollout batch followed by its updates; ``rollout_batch_size`` counts
prompts per step (GRPO samples ``group_size`` completions for each); ``mini_batch_size``
counts sequences per optimizer step; ``micro_batch_size`` counts sequences per
forward/backward (gradient accumulation = mini_batch_size // micro_batch_size);
``warmup_steps`` counts optimizer steps.

Under torchrun with ``world`` ranks the batch sizes stay global: each rank samples
``rollout_batch_size / world`` prompts and holds ``mini_batch_size / world`` sequences of each
mini-batch, in forwards of ``micro_batch_size`` sequences (so both must divide by ``world``,
and ``micro_batch_size`` must divide ``mini_batch_size / world``; the trainer checks).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass

from rlhf_fast.ops import LOSS_AGGS

KL_ESTIMATORS = ("k1", "abs", "k2", "k3")
LM_HEAD_MODES = ("fused", "materialize")


class ConfigError(ValueError):
    """A config field holds a bad value; the message names the field."""


@dataclass
class RunConfig:
    """Fields shared by every trainer (RL and supervised): run, optimiser, model execution,
    checkpoints, logging and distribution. Subclasses override defaults and add their own."""

    # run
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:N"
    # optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # AdamW's implementation: "fused" (torch's one-kernel step: no per-parameter temporaries, less peak
    # memory, faster) | "foreach" | "for_loop"; "auto": fused for floating-point params on CPU / CUDA
    adam_impl: str = "auto"
    lr_scheduler: str = "constant"  # after warmup: "constant" | "linear" | "cosine" decay to min_lr_ratio
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    micro_batch_size: int = 8
    # model execution
    attn_implementation: str = "auto"  # "auto": flash_attention_2 on CUDA when flash-attn imports, else sdpa
    precision: str = "auto"  # compute: "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp16" (autocast, loss scaling) | "fp32"
    master_weights: str = "fp32"  # trainable weights + optimizer state: "fp32" (a bf16 checkpoint is upcast) | "model" (as loaded)
    frozen_dtype: str = "auto"  # reference / reward models: "auto" (as loaded) | "bf16" | "fp32"
    gradient_checkpointing: bool = False
    router_aux_loss_coef: float | None = None  # MoE load-balancing loss weight; None: the model config's, 0: off
    # model loading (the CLI's loaders)
    model_dtype: str = "auto"  # dtype of loaded weights: "auto" (the checkpoint's) | "fp32" | "bf16" | "fp16"
    trust_remote_code: bool = False
    model_init_kwargs: str = ""  # a JSON object of extra from_pretrained kwargs, e.g. '{"revision": "main"}'
    # LoRA through PEFT (lora_r > 0 or peft_config turns it on); PPO/GRPO's reference = the base, adapters off
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # RL stages turn dropout off (log-probs must match the sampler's)
    lora_target_modules: str = "all-linear"  # "all-linear" or comma-separated module names (q_proj,v_proj)
    peft_config: str = ""  # a JSON file of peft.LoraConfig fields (instead of the lora_* fields)
    lora_export_merged: bool = False  # also export final/merged: the adapter merged into full weights
    # where a response ends (stops.py): comma-separated tokens that replace the chat template's detected
    # end-of-turn token; the tokenizer's EOS and the model's generation_config EOS ids always stop
    stop_tokens: str = ""
    # checkpoints and logging
    save_steps: int = 0  # 0: a checkpoint at the end only
    keep_checkpoints: int = 2
    resume_from: str = ""  # "" fresh run | "latest" (output_dir/checkpoints) | a checkpoint folder
    overwrite_output_dir: bool = False  # a fresh run may replace the run already in output_dir
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True
    # distribution: used when torchrun launches the run (WORLD_SIZE > 1), ignored otherwise
    distributed_strategy: str = "fsdp"  # the trained model: "fsdp" (FSDP2 fully_shard per block) | "ddp"
    dist_timeout_s: float = 1800.0  # a collective waiting longer (a peer died or hangs) fails the run

    def __post_init__(self):
        check_types(self)
        check_field(self, "device", self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for name in ("micro_batch_size", "keep_checkpoints"):
            check_field(self, name, getattr(self, name) >= 1, "must be >= 1")
        for name in ("warmup_steps", "save_steps"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        check_field(self, "learning_rate", self.learning_rate > 0, "must be > 0")
        for name in ("weight_decay", "max_grad_norm", "adam_eps"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        for name in ("adam_beta1", "adam_beta2", "min_lr_ratio"):
            check_field(self, name, 0 <= getattr(self, name) <= 1, "must lie in [0, 1]")
        check_choice(self, "adam_impl", ("auto", "fused", "foreach", "for_loop"))
        check_choice(self, "lr_scheduler", ("constant", "linear", "cosine"))
        check_choice(self, "attn_implementation", ("auto", "flash_attention_2", "sdpa", "eager"))
        check_choice(self, "precision", ("auto", "bf16", "fp16", "fp32"))
        check_choice(self, "master_weights", ("fp32", "model"))
        check_choice(self, "frozen_dtype", ("auto", "bf16", "fp32"))
        check_choice(self, "model_dtype", ("auto", "fp32", "bf16", "fp16"))
        if self.router_aux_loss_coef is not None:
            check_field(self, "router_aux_loss_coef", self.router_aux_loss_coef >= 0, "must be >= 0 (or None)")
        check_field(self, "lora_r", self.lora_r >= 0, "must be >= 0 (0: no LoRA)")
        check_field(self, "lora_alpha", self.lora_alpha > 0, "must be > 0")
        check_field(self, "lora_dropout", 0 <= self.lora_dropout < 1, "must lie in [0, 1)")
        check_field(self, "lora_target_modules", bool(self.lora_target_modules.strip()), "must not be empty")
        check_field(self, "peft_config", not (self.peft_config and self.lora_r), "set either peft_config or lora_r, not both")
        if self.model_init_kwargs:
            try:
                kw = json.loads(self.model_init_kwargs)
            except ValueError as e:
                kw = e
            check_field(self, "model_init_kwargs", isinstance(kw, dict), "must be a JSON object")
        check_choice(self, "distributed_strategy", ("fsdp", "ddp"))
        check_field(self, "dist_timeout_s", self.dist_timeout_s > 0, "must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Builds the config from a flat dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


@dataclass
class RLConfig(RunConfig):
    """Fields shared by PPO and GRPO (and those of RunConfig)."""

    output_dir: str = "runs/rl"
    total_steps: int = 100
    # rollouts
    rollout_batch_size: int = 8
    max_prompt_length: int = 256
    prompt_truncation: str = "left"  # longer prompts: "left" keeps their end, "right" their start, "error" raises
    max_new_tokens: int = 64
    temperature: float = 1.0  # sampling AND the log-probs of the loss use it; no top-k / top-p (they would differ)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion that never emits a stop token
    # several reward functions (a list as reward_fn): their weights, comma-separated ("1.0,0.1"; a list in
    # YAML or Python); "" weighs each 1. score = sum of weight * reward over the functions with an opinion
    reward_weights: str = ""
    # optimisation
    mini_batch_size: int = 8
    clip_eps: float = 0.2
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    # held-out evaluation: with the trainer's eval_prompts, score them every eval_steps steps (0: at the end only)
    eval_steps: int = 0
    # "fused": log-probs and the policy loss from hidden states (linear_token_logprobs /
    # linear_ppo_policy_loss; no (tokens, vocab) tensor) | "materialize": the LM head's logits, then the ops
    lm_head: str = "fused"
    # distribution
    frozen_model_sharding: str = "shard"  # the reference and reward models: "shard" (FSDP2) | "replicate"

    def __post_init__(self):
        if isinstance(self.reward_weights, (list, tuple)):
            self.reward_weights = ",".join(str(w) for w in self.reward_weights)
        super().__post_init__()
        check_field(self, "total_steps", self.total_steps >= 1, "must be >= 1")
        try:
            weights = self.weights
        except ValueError:
            weights = []
        check_field(self, "reward_weights", weights is None or (weights and all(map(math.isfinite, weights))),
                    "must be comma-separated finite numbers, one per reward function")
        for name in ("rollout_batch_size", "max_prompt_length", "max_new_tokens", "mini_batch_size"):
            check_field(self, name, getattr(self, name) >= 1, "must be >= 1")
        check_field(self, "eval_steps", self.eval_steps >= 0, "must be >= 0")
        check_choice(self, "prompt_truncation", ("left", "right", "error"))
        check_choice(self, "loss_agg", LOSS_AGGS)
        check_choice(self, "lm_head", LM_HEAD_MODES)
        check_choice(self, "frozen_model_sharding", ("shard", "replicate"))
        check_field(self, "temperature", self.temperature > 0, "must be > 0")
        for name in ("missing_eos_penalty", "entropy_coef"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        check_field(self, "clip_eps", 0 < self.clip_eps < 1, "must lie in (0, 1)")
        check_field(self, "mini_batch_size", self.sequences_per_step % self.mini_batch_size == 0,
               f"must divide the {self.sequences_per_step} sequences sampled per step")
        check_field(self, "micro_batch_size", self.mini_batch_size % self.micro_batch_size == 0,
               f"must divide mini_batch_size={self.mini_batch_size}")

    @property
    def sequences_per_step(self) -> int:
        return self.rollout_batch_size

    @property
    def weights(self) -> list[float] | None:
        """``reward_weights`` as floats (None when empty)."""
        if not self.reward_weights.strip():
            return None
        return [float(w) for w in self.reward_weights.split(",")]

    def check_world_size(self, world: int) -> None:
        """The batch sizes split evenly over ``world`` ranks (module docstring)."""
        for name in ("rollout_batch_size", "mini_batch_size"):
            check_field(self, name, getattr(self, name) % world == 0,
                   f"must be divisible by the world size {world} (each rank takes an equal share)")
        local = self.mini_batch_size // world
        check_field(self, "micro_batch_size", local % self.micro_batch_size == 0,
               f"must divide the {local} sequences of a mini-batch each of the {world} ranks holds")

    @property
    def grad_accumulation(self) -> int:
        return self.mini_batch_size // self.micro_batch_size


@dataclass
class PPOConfig(RLConfig):
    """PPO with a value head: KL-shaped rewards, GAE, clipped policy and value losses."""

    output_dir: str = "runs/ppo"
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05  # initial coefficient of the KL penalty in the rewards
    kl_estimator: str = "k1"
    adaptive_kl: bool = False  # Ziegler et al.: steer kl_coef towards kl_target over kl_horizon sequences
    kl_target: float = 6.0
    kl_horizon: int = 10000
    vf_coef: float = 0.1
    vf_clip: float = 0.2  # value clipping range around the rollout values; 0 turns it off

    def __post_init__(self):
        super().__post_init__()
        check_field(self, "ppo_epochs", self.ppo_epochs >= 1, "must be >= 1")
        check_field(self, "gamma", 0 <= self.gamma <= 1, "must lie in [0, 1]")
        check_field(self, "lam", 0 <= self.lam <= 1, "must lie in [0, 1]")
        check_choice(self, "kl_estimator", KL_ESTIMATORS)
        for name in ("kl_coef", "vf_clip"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        check_field(self, "vf_coef", self.vf_coef > 0, "must be > 0 (the value head is trained by this loss)")
        check_field(self, "kl_target", self.kl_target > 0, "must be > 0")
        check_field(self, "kl_horizon", self.kl_horizon >= 1, "must be >= 1")


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: group-relative advantages, KL to the reference inside the loss, no value head."""

    output_dir: str = "runs/grpo"
    group_size: int = 4
    num_iterations: int = 1  # policy updates (passes) per rollout batch
    beta: float = 0.04  # coefficient of the k3 KL to the reference in the loss; 0 skips the reference
    clip_eps_high: float | None = None  # clip-higher (DAPO); None: the same as clip_eps
    baseline: str = "mean"  # "mean" (GRPO) | "leave_one_out" (RLOO)
    scale: str = "group"  # divide advantages by the group std | the batch std | "none" (Dr. GRPO)
    loss_type: str = "grpo"  # TRL's: "grpo" | "bnpo" | "dr_grpo" | "dapo" | "cispo" | "sapo"; sets loss_agg
    loss_agg: str = ""  # derived from loss_type; leave empty
    # the objective (rlhf_fast.ops.policy_objectives states each formula)
    importance_sampling_level: str = "token"  # "token" | "sequence" (GSPO: exp(mean log-ratio)) | "sequence_token"
    kl_estimator: str = "k3"  # of the beta KL: "k1" | "abs" | "k2" | "k3" | "low_var_kl" | "k3+" (verl)
    sapo_temperature_pos: float = 1.0  # loss_type="sapo": gate temperature of A > 0 tokens (SAPO's default)
    sapo_temperature_neg: float = 1.05  # ... and of A <= 0 tokens
    # rollout-mismatch correction from the sampler's own log-probs (recorded during generation)
    rollout_correction: str | None = None  # None | "tis" (truncate) | "mis" (mask) | "icepop" (two-sided token mask)
    rollout_correction_level: str = "token"  # "token" | "sequence" (tis / mis)
    rollout_correction_low: float | None = None  # lower bound (None: tis / mis none, icepop 0.5)
    rollout_correction_high: float | None = None  # upper bound (None: tis / mis 2.0, icepop 5.0)
    use_sampler_logprobs_as_old: bool = False  # skip the old-log-prob forward (needs num_iterations=1, no correction)
    # DAPO's sampling tricks
    dynamic_sampling: bool = False  # drop groups whose scores are all equal and sample more prompts to refill
    dynamic_sampling_max_tries: int = 4  # sampling rounds per step at most (then equal groups fill the rest)
    overlong_buffer: int = 0  # > 0: soft length penalty over the last overlong_buffer of max_new_tokens (DAPO)
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens (it rises linearly over the buffer)
    mask_truncated_completions: bool = False  # completions without EOS get no loss (DAPO overlong filtering)

    def __post_init__(self):
        check_choice(self, "loss_type", tuple(GRPO_LOSS_AGG))
        if self.loss_agg in ("", None):
            self.loss_agg = GRPO_LOSS_AGG[self.loss_type]
        elif self.loss_agg != GRPO_LOSS_AGG[self.loss_type]:
            raise ConfigError(f"GRPOConfig.loss_agg={self.loss_agg!r}: set loss_type instead "
                              f"(loss_type={self.loss_type!r} means loss_agg={GRPO_LOSS_AGG[self.loss_type]!r})")
        super().__post_init__()
        check_field(self, "group_size", self.group_size >= 2, "must be >= 2 (advantages compare completions of one prompt)")
        check_field(self, "num_iterations", self.num_iterations >= 1, "must be >= 1")
        check_field(self, "beta", self.beta >= 0, "must be >= 0")
        if self.clip_eps_high is not None:
            check_field(self, "clip_eps_high", self.clip_eps_high >= self.clip_eps, f"must be >= clip_eps={self.clip_eps}")
        check_choice(self, "baseline", ("mean", "leave_one_out"))
        check_choice(self, "scale", ("group", "batch", "none"))
        check_choice(self, "importance_sampling_level", ("token", "sequence", "sequence_token"))
        check_choice(self, "kl_estimator", KL_ESTIMATORS + ("low_var_kl", "k3+"))
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            check_field(self, name, getattr(self, name) > 0, "must be > 0")
        check_choice(self, "rollout_correction", (None, "tis", "mis", "icepop"))
        check_choice(self, "rollout_correction_level", ("token", "sequence"))
        check_field(self, "rollout_correction_level",
                    self.rollout_correction != "icepop" or self.rollout_correction_level == "token",
                    "must be 'token' with rollout_correction='icepop'")
        for name in ("rollout_correction_low", "rollout_correction_high"):
            check_field(self, name, getattr(self, name) is None or getattr(self, name) >= 0, "must be >= 0 or None")
        if self.use_sampler_logprobs_as_old:
            check_field(self, "use_sampler_logprobs_as_old", self.num_iterations == 1,
                        f"needs num_iterations=1 (got {self.num_iterations}): later passes need the old policy")
            check_field(self, "use_sampler_logprobs_as_old", self.rollout_correction is None,
                        "the sampler's log-probs are then the old ones, so a rollout_correction would be 1: drop it")
        check_field(self, "dynamic_sampling_max_tries", self.dynamic_sampling_max_tries >= 1, "must be >= 1")
        check_field(self, "overlong_buffer", 0 <= self.overlong_buffer <= self.max_new_tokens,
                    f"must lie in [0, max_new_tokens={self.max_new_tokens}]")
        check_field(self, "overlong_penalty", self.overlong_penalty >= 0, "must be >= 0")

    @property
    def sequences_per_step(self) -> int:
        return self.rollout_batch_size * self.group_size


# TRL's loss types as our aggregation modes: "grpo" averages each sequence's tokens then the
# sequences; "bnpo" and "dapo" average all tokens of the batch (we normalise over the
# mini-batch in both); "dr_grpo" sums each sequence and divides by max_new_tokens.
GRPO_LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                 "dr_grpo": "seq-mean-token-sum-norm", "cispo": "token-mean", "sapo": "seq-mean-token-mean"}


# ---------------------------------------------------------------------------- checks
def check_field(cfg, name, ok, why):
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}.{name}={getattr(cfg, name)!r}: {why}")


def check_choice(cfg, name, choices):
    check_field(cfg, name, getattr(cfg, name) in choices, f"must be one of {', '.join(map(repr, choices))}")


def check_types(cfg):
    """Each field must hold its annotated simple type (an int is accepted for a float, and
    coerced); non-finite floats are rejected."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(hint) or (hint,)
        if value is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, f.name, value)
        if not any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed
                   if t is not type(None)):
            names = " or ".join(t.__name__ for t in allowed)
            raise ConfigError(f"{type(cfg).__name__}.{f.name}={value!r}: must be {names}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{type(cfg).__name__}.{f.name}={value!r}: must be finite")
