"""What PPO and GRPO share: setup (device, precision, attention, models, prompts, optimizer,
LR schedule), prompt batches, mini/micro-batching with exact loss normalisation, the optimizer
step with its non-finite guard, step metrics, checkpoints and resume.

The training loops themselves live in ``ppo.py`` and ``grpo.py``. The pieces a distributed
layer will wrap are separate functions/methods: ``sample`` (rollout generation),
``compute_advantages`` (in each trainer), ``micro_batches`` (loss normalisation: the token /
sequence counts of a mini-batch are what an all-reduce would sum) and ``reduce_stats``
(metric reduction).
"""
from __future__ import annotations

import copy
import functools
import math
import random
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.trainer import checkpoint as ckpt
from rlhf_fast.trainer.config import RLConfig
from rlhf_fast.trainer.metrics import MetricsLogger, is_main_process
from rlhf_fast.trainer.model import PolicyValueModel, resolve_attn_implementation
from rlhf_fast.trainer.rollout import Rollout, encode_prompts, sample_rollout, special_ids


# fields a resumed run may change without a warning
_FREE_ON_RESUME = {"resume_from", "total_steps", "output_dir", "save_steps", "keep_checkpoints", "progress_bar",
                   "tensorboard", "plot", "device"}


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the run stops before the optimizer step."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return dev


def disable_dropout(module: nn.Module) -> None:
    """RL recomputes log-probs that must match the sampler's: dropout off everywhere."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def lr_multiplier(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR / peak LR at optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then
    constant, or linear / cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return min_ratio + (1.0 - min_ratio) * shape


class RLTrainer:
    """Base of PPOTrainer / GRPOTrainer (see their docstrings for the arguments)."""

    config_class = RLConfig
    uses_value_head = False

    def __init__(self, config, *, model, tokenizer, prompts, ref_model=None, reward_fn=None, reward_model=None):
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("pass exactly one of reward_fn (prompts, completions -> scores) and reward_model")
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError("reward_fn must be callable as reward_fn(prompts, completions)")
        if tokenizer is None:
            raise ValueError("tokenizer is required (prompts are text; completions are decoded for reward_fn)")
        self.config = cfg = config
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # mini-batch shuffling

        # the policy (+ value head) ...
        if not isinstance(model, PolicyValueModel):
            model = PolicyValueModel(model, value_head=self.uses_value_head)
        if self.uses_value_head and model.value_head is None:
            raise ValueError(f"{type(self).__name__} needs a PolicyValueModel with a value head")
        # ... the frozen reference: the initial policy unless given
        if isinstance(ref_model, PolicyValueModel):
            ref_model = ref_model.policy
        if ref_model is not None and ref_model is model.policy:
            raise ValueError("ref_model is the policy itself; pass a frozen copy, or None to copy the initial policy")
        self.ref_model = self._frozen(ref_model if ref_model is not None else copy.deepcopy(model.policy))
        self.reward_model = self._frozen(reward_model) if reward_model is not None else None
        self.reward_fn = reward_fn
        attn = resolve_attn_implementation(cfg.attn_implementation, self.device)
        for m in (model.policy, model.critic, self.ref_model):
            if m is not None and hasattr(m, "set_attn_implementation") and m.config._attn_implementation != attn:
                m.set_attn_implementation(attn)
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = model.to(self.device).train()

        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = special_ids(tokenizer)
        self.prompts = list(prompts)
        self.prompt_ids = encode_prompts(tokenizer, self.prompts, cfg.max_prompt_length, cfg.prompt_truncation)
        limit = getattr(model.policy.config.get_text_config(), "max_position_embeddings", None)
        longest = max(len(p) for p in self.prompt_ids)
        if limit is not None and longest + cfg.max_new_tokens > limit:
            raise ValueError(f"the longest prompt ({longest} tokens, at most max_prompt_length="
                             f"{cfg.max_prompt_length}) + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={limit}")

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.total_optimizer_steps = cfg.total_steps * self.updates_per_rollout * (
            cfg.sequences_per_step // cfg.mini_batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_multiplier, warmup=cfg.warmup_steps, total=self.total_optimizer_steps, schedule=cfg.lr_scheduler,
            min_ratio=cfg.min_lr_ratio))
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.step = 0
        self.init_state()
        if cfg.resume_from:
            self.resume(cfg.resume_from)

    @property
    def updates_per_rollout(self) -> int:
        raise NotImplementedError

    def _frozen(self, m: nn.Module) -> nn.Module:
        disable_dropout(m)
        return m.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------ precision
    def autocast(self):
        """bf16 autocast on CUDA ("auto" / "bf16"), and on CPU only with precision="bf16"."""
        p, dev = self.config.precision, self.device.type
        enabled = p == "bf16" or (p == "auto" and dev == "cuda")
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------ rollouts
    def prompt_indices(self, step: int) -> list[int]:
        """The prompts of ``step``: consecutive slices of a fresh seeded permutation per pass over
        the prompt list (a function of the step alone, so resuming needs no sampler state)."""
        n, bs = len(self.prompts), self.config.rollout_batch_size
        out = []
        for i in range(step * bs, (step + 1) * bs):
            epoch, pos = divmod(i, n)
            out.append(self._permutation(epoch)[pos])
        return out

    def _permutation(self, epoch: int) -> list[int]:
        cache = self.__dict__.setdefault("_perm_cache", {})
        if epoch not in cache:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            if len(cache) > 4:
                cache.clear()
            cache[epoch] = torch.randperm(len(self.prompts), generator=g).tolist()
        return cache[epoch]

    def sample(self, step: int, repeat: int = 1) -> Rollout:
        """Samples ``repeat`` completions for each of the step's prompts (copies consecutive) and scores them."""
        cfg = self.config
        idx = [i for i in self.prompt_indices(step) for _ in range(repeat)]
        return sample_rollout(self.model.policy, self.tokenizer, [self.prompts[i] for i in idx],
                              [self.prompt_ids[i] for i in idx], max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, device=self.device, reward_fn=self.reward_fn,
                              reward_model=self.reward_model, missing_eos_penalty=cfg.missing_eos_penalty,
                              autocast=self.autocast)

    # ------------------------------------------------------------------ batching
    def mini_batches(self, n: int):
        """Shuffled index sets of mini_batch_size sequences covering range(n) once."""
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        return perm.split(self.config.mini_batch_size)

    def micro_batches(self, batch: Rollout, mini: torch.Tensor):
        """Yields (micro_batch, scale): summing ``scale * loss(micro_batch)`` over the micro-batches
        gives exactly ``loss(mini-batch)`` for the configured ``loss_agg`` (token-mean weighs each
        micro-batch by its share of the valid tokens, the sequence means by its share of the
        sequences that have tokens, the "-norm" sum by its share of sequences)."""
        agg = self.config.loss_agg
        mask = batch.response_mask[mini]
        if agg == "token-mean":
            per_row = mask.sum(-1).float()
        elif agg == "seq-mean-token-sum-norm":
            per_row = torch.ones(mask.shape[0], device=mask.device)
        else:
            per_row = mask.any(-1).float()
        total = per_row.sum().clamp(min=1)
        for part, rows in zip(mini.split(self.config.micro_batch_size),
                              per_row.split(self.config.micro_batch_size)):
            yield batch.select(part), rows.sum() / total

    # ------------------------------------------------------------------ optimisation
    def optimizer_step(self, step: int, loss_sum: torch.Tensor) -> torch.Tensor:
        """Clips, checks loss and gradient norm are finite (one host sync), steps optimizer and LR."""
        cfg = self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        ok = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        if not bool(ok):
            what = "loss" if not bool(torch.isfinite(loss_sum)) else "gradient norm"
            self.optimizer.zero_grad(set_to_none=True)
            self.stop_non_finite(step + 1, f"non-finite {what} (loss {float(loss_sum)}, grad norm "
                                           f"{float(grad_norm)}); stopped before the optimizer step")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def check_finite(self, name: str, x: torch.Tensor, step: int) -> None:
        """Stops the run when a rollout quantity holds NaN/Inf (one host sync)."""
        if not bool(torch.isfinite(x).all()):
            self.stop_non_finite(step, f"{name} has {int((~torch.isfinite(x)).sum())} non-finite value(s)")

    def stop_non_finite(self, step: int, what: str):
        latest = ckpt.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.exists() else None
        raise NonFiniteError(f"step {step}: {what}. Nothing was saved for this step; the last good checkpoint is "
                             f"{latest if latest is not None else 'none (no checkpoint saved yet)'}")

    @staticmethod
    def reduce_stats(stats: list[dict]) -> dict:
        """Means of per-micro-batch 0-d tensor stats, converted with one host sync."""
        if not stats:
            return {}
        keys = list(stats[0])
        means = torch.stack([torch.stack([s[k].detach().float() for s in stats]).mean() for k in keys])
        return dict(zip(keys, means.tolist()))

    def rollout_metrics(self, batch: Rollout, t_rollout: float, t_update: float) -> dict:
        """Batch-level metrics of a step (one host sync)."""
        mask = batch.response_mask
        m = mask.float()
        lengths = m.sum(-1)
        out = {"reward/mean": batch.scores.mean(), "reward/std": batch.scores.std() if len(batch) > 1 else
               torch.zeros(()), "response/length": lengths.mean(), "response/eos_frac": batch.has_eos.float().mean()}
        if batch.ref_logprobs is not None:  # sum over the completion of log pi - log pi_ref (k1), mean over sequences
            out["kl/ref"] = ((batch.logprobs - batch.ref_logprobs) * m).sum(-1).mean()
        out = dict(zip(out, torch.stack([v.float().cpu() for v in out.values()]).tolist()))
        n_tokens = float(out["response/length"]) * len(batch)
        out.update({"time/rollout_s": t_rollout, "time/update_s": t_update,
                    "perf/tokens_per_s": n_tokens / max(t_rollout + t_update, 1e-9),
                    "lr": self.scheduler.get_last_lr()[0]})
        if self.device.type == "cuda":
            out["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    @staticmethod
    def timer():
        return time.perf_counter()

    # ------------------------------------------------------------------ checkpoints
    def metrics_logger(self) -> MetricsLogger:
        cfg = self.config
        return MetricsLogger(self.output_dir, cfg.total_steps, start_step=self.step, progress=cfg.progress_bar,
                             tensorboard=cfg.tensorboard, plot=cfg.plot, desc=type(self).__name__)

    def init_state(self) -> None:
        """Hook: trainer-specific state that checkpoints hold (created before a resume)."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def save(self) -> Path | None:
        """Checkpoint at the current step (rank 0 only); returns its path."""
        if not is_main_process():
            return None
        state = {"config": self.config.to_dict(), **self.extra_state()}
        return ckpt.save_checkpoint(self.checkpoint_dir, self.step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, state=state, generators={"shuffle": self.generator},
                                    keep_last=self.config.keep_checkpoints)

    def maybe_save(self) -> None:
        cfg = self.config
        if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.total_steps:
            self.save()

    def resume(self, where: str) -> None:
        """Restores a checkpoint: ``where`` is "latest" (this run's newest; a fresh start when there
        is none) or a checkpoint folder."""
        path = ckpt.latest_checkpoint(self.checkpoint_dir) if where == "latest" else Path(where)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     generators={"shuffle": self.generator}, map_location=self.device)
        self.step = int(state["step"])
        self.load_extra_state(state)
        saved = state.get("config", {})
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k in saved and saved[k] != v and k not in _FREE_ON_RESUME)
        if changed:
            warnings.warn(f"resuming {path} with changed config fields: "
                          + ", ".join(f"{k}={saved[k]!r} -> {getattr(self.config, k)!r}" for k in changed))

    def export(self, path=None) -> Path:
        """Writes the trained model (HF checkpoint + value head) and tokenizer to ``path``
        (default ``output_dir/final``)."""
        path = Path(path) if path is not None else self.output_dir / "final"
        if is_main_process():
            self.model.save_pretrained(path)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(path)
        return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
