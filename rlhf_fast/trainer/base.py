"""What PPO and GRPO share: setup (device, precision, attention, models, prompts, optimizer,
LR schedule), prompt batches, mini/micro-batching with exact loss normalisation, the optimizer
step with its non-finite guard, step metrics, checkpoints and resume.

The training loops themselves live in ``ppo.py`` and ``grpo.py``. Under torchrun
(``WORLD_SIZE > 1``) the trainer joins the job and goes global at the separated steps
(``distributed.py``): ``sample`` draws this rank's share of the step's prompts,
``compute_advantages`` whitens / scales with all-reduced moments, ``mini_batches`` gives every
rank its share of the same global mini-batches, ``micro_batches`` normalises by all-reduced
token / sequence counts, and ``reduce_stats`` / ``rollout_metrics`` all-reduce what is logged.

Mini-batches are stratified: a pass over a step's ``n`` sequences cuts them into
``mini_batch_size`` consecutive slots of ``k = n / mini_batch_size`` sequences and draws, per
slot, a random permutation saying which mini-batch gets which of its sequences. Every
mini-batch takes one sequence of each slot, and a rank holding whole slots holds its share of
every mini-batch without any data moving: the update does not depend on the world size.
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
from rlhf_fast.trainer import distributed
from rlhf_fast.trainer.config import RLConfig
from rlhf_fast.trainer.metrics import MetricsLogger
from rlhf_fast.trainer.model import PolicyValueModel, resolve_attn_implementation
from rlhf_fast.trainer.rollout import Rollout, encode_prompts, rollout_logprobs, sample_rollout, special_ids


# fields a resumed run may change without a warning
_FREE_ON_RESUME = {"resume_from", "total_steps", "output_dir", "save_steps", "keep_checkpoints", "progress_bar",
                   "tensorboard", "plot", "device", "distributed_strategy", "frozen_model_sharding", "dist_timeout_s"}


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


class Checkpointing:
    """save / resume of a trainer (RLTrainer, SupervisedTrainer) that holds ``config`` (with
    ``to_dict()`` and ``keep_checkpoints``), ``checkpoint_dir``, ``step``, ``model``,
    ``optimizer``, ``scheduler``, ``generator`` (the shuffle RNG), ``rank``, ``world_size`` and
    ``device``. Hooks: ``extra_state`` / ``load_extra_state`` (trainer-specific state)."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def save(self) -> Path | None:
        """Atomic checkpoint of model, optimizer, scheduler, RNGs and ``extra_state()`` at the
        current step (every rank calls it; rank 0 writes the gathered full state and gets its
        path, the others None)."""
        state = {"config": self.config.to_dict(), "world_size": self.world_size, **self.extra_state()}
        return distributed.save_checkpoint(self.checkpoint_dir, self.step, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, state=state,
                                           generators={"shuffle": self.generator},
                                           keep_last=self.config.keep_checkpoints)

    def resume(self, where: str) -> None:
        """Restores a checkpoint: ``where`` is "latest" (this run's newest; a fresh start when there
        is none) or a checkpoint folder."""
        self._restore(where)

    def _restore(self, where: str):
        """(path, state) of the checkpoint loaded into the trainer, or None when ``where`` is
        "latest" and there is none."""
        path = None
        if self.rank == 0:  # rank 0 alone needs to see the files
            path = ckpt.latest_checkpoint(self.checkpoint_dir) if where == "latest" else Path(where)
        path = distributed.broadcast_object(path)
        if path is None:
            return None
        state = distributed.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                            scheduler=self.scheduler, generators={"shuffle": self.generator},
                                            map_location=self.device)
        self.step = int(state["step"])
        self.load_extra_state(state)
        return path, state


class RLTrainer(Checkpointing):
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
        distributed.init_distributed(cfg.device, cfg.dist_timeout_s)  # under torchrun: join the job
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        cfg.check_world_size(self.world_size)
        self.device = distributed.rank_device(cfg.device) if distributed.is_distributed() else resolve_device(cfg.device)
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
        ref_model = ref_model if ref_model is not None else copy.deepcopy(model.policy)
        attn = resolve_attn_implementation(cfg.attn_implementation, self.device)
        for m in (model.policy, model.critic, ref_model):
            if m is not None and hasattr(m, "set_attn_implementation") and m.config._attn_implementation != attn:
                m.set_attn_implementation(attn)
        self.ref_model = self._frozen(ref_model)
        self.reward_model = self._frozen(reward_model) if reward_model is not None else None
        self.reward_fn = reward_fn
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if model.value_head is not None and not self.uses_value_head:
            model.value_head.requires_grad_(False)  # never in the loss (DDP refuses unused parameters)
        # self.model: the PolicyValueModel (FSDP-sharded in place); self.train_model: what the
        # loss's forward goes through (self.model, or its DDP wrapper)
        self.model, self.train_model = distributed.prepare_trainable(model.train(), cfg.distributed_strategy,
                                                                     self.device)

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
        m = m.eval().requires_grad_(False)
        return distributed.prepare_frozen(m, self.config.frozen_model_sharding, self.device)

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
        """Samples ``repeat`` completions for each of this rank's prompts of the step (the r-th of
        ``world_size`` contiguous shares; copies consecutive, so a group stays on its rank) and
        scores them."""
        cfg = self.config
        share = cfg.rollout_batch_size // self.world_size
        mine = self.prompt_indices(step)[self.rank * share : (self.rank + 1) * share]
        idx = [i for i in mine for _ in range(repeat)]
        if self.world_size > 1:  # a sampling stream per (step, rank), whatever happened before
            torch.manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + self.rank) % 2**63)
        with (distributed.gathered(self.model, within=self.model.policy),
              distributed.gathered(self.reward_model, full=False)):
            return sample_rollout(self.model.policy, self.tokenizer, [self.prompts[i] for i in idx],
                                  [self.prompt_ids[i] for i in idx], max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, device=self.device, reward_fn=self.reward_fn,
                                  reward_model=self.reward_model, missing_eos_penalty=cfg.missing_eos_penalty,
                                  autocast=self.autocast)

    def frozen_logprobs(self, batch: Rollout) -> torch.Tensor:
        """(B, R) log-probs of the frozen reference at the sampling temperature."""
        cfg = self.config
        with distributed.gathered(self.ref_model, full=False):
            return rollout_logprobs(self.ref_model, batch, temperature=cfg.temperature,
                                    micro_batch_size=cfg.micro_batch_size, autocast=self.autocast)[0]

    # ------------------------------------------------------------------ batching
    def mini_batches(self, n: int) -> list[torch.Tensor]:
        """This rank's rows (of its ``n``) in each mini-batch of one shuffled pass over the step's
        sequences (stratified, see the module docstring; the same on every rank)."""
        return [m.to(self.device) for m in mini_batch_indices(n, self.config.mini_batch_size, self.generator,
                                                              self.rank, self.world_size)]

    def micro_batches(self, batch: Rollout, mini: torch.Tensor):
        """Yields (micro_batch, scale): summing ``scale * loss(micro_batch)`` over the micro-batches
        gives exactly ``loss(mini-batch)`` for the configured ``loss_agg`` (token-mean weighs each
        micro-batch by its share of the valid tokens, the sequence means by its share of the
        sequences that have tokens, the "-norm" sum by its share of sequences).

        Under ``world`` ranks the shares are of the global mini-batch (the totals are
        all-reduced) and scaled by ``world``, since DDP / FSDP average the ranks' gradients:
        ``mean_r(sum_m scale * grad loss(micro))`` is the gradient of the global mini-batch loss."""
        agg = self.config.loss_agg
        mask = batch.response_mask[mini]
        if agg == "token-mean":
            per_row = mask.sum(-1).float()
        elif agg == "seq-mean-token-sum-norm":
            per_row = torch.ones(mask.shape[0], device=mask.device)
        else:
            per_row = mask.any(-1).float()
        total = distributed.all_reduce(per_row.sum()).clamp(min=1)
        world = distributed.world_size()
        for part, rows in zip(mini.split(self.config.micro_batch_size),
                              per_row.split(self.config.micro_batch_size)):
            yield batch.select(part), rows.sum() * world / total

    # ------------------------------------------------------------------ optimisation
    def optimize_mini_batch(self, batch: Rollout, mini: torch.Tensor, step: int):
        """One optimizer step on mini-batch ``mini``: forward/backward per micro-batch (gradients
        accumulate; DDP all-reduces at the last one only), then ``optimizer_step``. Returns
        (per-micro-batch stats, grad norm)."""
        micros = list(self.micro_batches(batch, mini))
        loss_sum = torch.zeros((), device=self.device)
        stats = []
        for i, (micro, scale) in enumerate(micros):
            with distributed.no_sync(self.train_model, skip=i < len(micros) - 1):
                loss, s = self.compute_loss(micro)
                (loss * scale).backward()
            loss_sum = loss_sum + loss.detach() * scale
            stats.append(s)
        return stats, self.optimizer_step(step, loss_sum)

    def optimizer_step(self, step: int, loss_sum: torch.Tensor) -> torch.Tensor:
        """Clips, checks loss and gradient norm are finite (one host sync), steps optimizer and LR.
        ``loss_sum``: this rank's sum of ``scale * loss(micro)`` (all-reduced here, so every rank
        takes the same decision)."""
        cfg = self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        grad_norm = distributed.local_tensor(grad_norm)  # FSDP: the global norm, as a replicated DTensor
        loss_sum = distributed.all_reduce(loss_sum) / self.world_size
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
        """Stops the run (every rank) when a rollout quantity holds NaN/Inf on any rank (one host sync)."""
        bad = int(distributed.all_reduce((~torch.isfinite(x)).sum()))
        if bad:
            self.stop_non_finite(step, f"{name} has {bad} non-finite value(s)")

    def stop_non_finite(self, step: int, what: str):
        latest = ckpt.latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.exists() else None
        raise NonFiniteError(f"step {step}: {what}. Nothing was saved for this step; the last good checkpoint is "
                             f"{latest if latest is not None else 'none (no checkpoint saved yet)'}")

    @staticmethod
    def reduce_stats(stats: list[dict]) -> dict:
        """Means of per-micro-batch 0-d tensor stats over every rank's micro-batches (ranks run
        equally many), converted with one host sync."""
        if not stats:
            return {}
        keys = list(stats[0])
        means = torch.stack([torch.stack([s[k].detach().float() for s in stats]).mean() for k in keys])
        means = distributed.all_reduce(means) / distributed.world_size()
        return dict(zip(keys, means.tolist()))

    def rollout_metrics(self, batch: Rollout, t_rollout: float, t_update: float) -> dict:
        """Batch-level metrics of a step over all ranks' sequences (means from all-reduced sums,
        the reward std from global moments, times of the slowest rank)."""
        m = batch.response_mask.float()
        lengths = m.sum(-1)
        sums = [torch.tensor(float(len(batch)), device=self.device), batch.scores.float().sum(), lengths.sum(),
                batch.has_eos.float().sum()]
        if batch.ref_logprobs is not None:  # sum over the completion of log pi - log pi_ref (k1), mean over sequences
            sums.append(((batch.logprobs - batch.ref_logprobs) * m).sum(-1).sum())
        sums = distributed.all_reduce(torch.stack(sums).double())
        std = distributed.global_moments(batch.scores)[2].sqrt()
        n, score, length, eos, *kl = (sums.cpu() / sums[0].cpu()).tolist()
        out = {"reward/mean": score, "reward/std": float(std), "response/length": length, "response/eos_frac": eos}
        if kl:
            out["kl/ref"] = kl[0]
        times = [t_rollout, t_update]
        if self.device.type == "cuda":
            times.append(torch.cuda.max_memory_allocated(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.device)
        times = distributed.all_reduce(torch.tensor(times, dtype=torch.float64, device=self.device), "max").tolist()
        out.update({"time/rollout_s": times[0], "time/update_s": times[1],
                    "perf/tokens_per_s": float(sums[2]) / max(times[0] + times[1], 1e-9),
                    "lr": self.scheduler.get_last_lr()[0]})
        if self.device.type == "cuda":
            out["perf/peak_mem_gib"] = times[2]
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

    def maybe_save(self) -> None:
        cfg = self.config
        if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.total_steps:
            self.save()

    def resume(self, where: str) -> None:
        """Restores a checkpoint (``Checkpointing.resume``) and warns about config fields that
        changed since it was written."""
        loaded = self._restore(where)
        if loaded is None:
            return
        path, state = loaded
        saved = state.get("config", {})
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k in saved and saved[k] != v and k not in _FREE_ON_RESUME)
        if changed and self.rank == 0:
            warnings.warn(f"resuming {path} with changed config fields: "
                          + ", ".join(f"{k}={saved[k]!r} -> {getattr(self.config, k)!r}" for k in changed))

    def export(self, path=None) -> Path:
        """Writes the trained model (HF checkpoint + value head) and tokenizer to ``path``
        (default ``output_dir/final``)."""
        path = Path(path) if path is not None else self.output_dir / "final"
        return distributed.export_pretrained(self.model, path, self.tokenizer)  # rank 0 writes


def mini_batch_indices(n: int, mini_batch_size: int, generator: torch.Generator, rank: int = 0,
                       world: int = 1) -> list[torch.Tensor]:
    """Rows of rank ``rank``'s ``n`` sequences (global rows ``rank*n .. (rank+1)*n - 1`` of
    ``world*n``) in each of the ``k = world*n / mini_batch_size`` stratified mini-batches:

        order = torch.rand(mini_batch_size, k, generator=generator).argsort(-1)  # a permutation per slot
        mini_batch[j] = [s * k + order[s, j] for s in range(mini_batch_size)]     # one row of each slot

    (the global rows; each rank keeps those of its ``mini_batch_size / world`` slots, shifted
    to its own rows). The same draw on every rank, so the union over ranks is the
    single-process mini-batch."""
    total = n * world
    if total % mini_batch_size or mini_batch_size % world:
        raise ValueError(f"mini_batch_size={mini_batch_size} must divide the {total} sequences and be divisible by "
                         f"the world size {world}")
    k, per_rank = total // mini_batch_size, mini_batch_size // world
    order = torch.rand(mini_batch_size, k, generator=generator).argsort(-1)
    local = torch.arange(per_rank)[:, None] * k + order[rank * per_rank : (rank + 1) * per_rank]
    return list(local.t().unbind())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
