"""The RL trainer that PPO and GRPO specialise: one ``train()`` loop and its hooks.

    for step in range(start, total_steps):
        batch = make_experience(step)        # sample + score (``rollout.py``), old / reference log-probs, values
        compute_advantages(batch)            # the algorithm's (ppo.py: KL-shaped GAE; grpo.py: group-relative)
        stats = update(batch, step)          # passes over mini-batches, each one optimizer step
        metrics = rollout_metrics(...) | stats   # + failure-mode metrics (health.py)
        after_step(batch, metrics)           # the algorithm's (ppo.py: KL controller, explained variance)
        with eval_prompts, every eval_steps: metrics |= evaluate_prompts(...)   # held-out, own RNG stream
        log; maybe_save()                    # a checkpoint every save_steps
    export(output_dir / "final")

Setup, the optimizer step with its non-finite guard, checkpoints and the export come from the
shared runtime (``runtime.py``). Global statistics go through the collectives (``collectives.py``;
each is the identity on one process): advantages are computed on the gathered global batch and
each rank keeps its rows, the mini- and micro-batches and their loss scales come from
``minibatch.py``, and the step's metrics are all-reduced (``step_metrics.py``). So the update
does not depend on the world size.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from rlhf_fast.encoding import prompt_rows
from rlhf_fast.stops import stop_token_ids
from rlhf_fast.trainer.collectives import all_reduce, gather_rows, global_max
from rlhf_fast.trainer.config import ConfigError, RLConfig
from rlhf_fast.trainer.health import evaluate_prompts
from rlhf_fast.trainer.hf_io import is_peft
from rlhf_fast.trainer.lora import adapters_disabled, apply_lora
from rlhf_fast.trainer.minibatch import micro_batches, mini_batch_indices
from rlhf_fast.trainer.model import PolicyValueModel, resolve_attn_implementation, router_aux_loss_coef
from rlhf_fast.trainer.reward_fns import RewardFunctions
from rlhf_fast.trainer.rollout import (
    RewardFunctionError,
    Rollout,
    encode_prompts,
    rollout_logprobs,
    sample_rollout,
    special_ids,
)
from rlhf_fast.trainer.runtime import Runtime, disable_dropout
from rlhf_fast.trainer.sharding import gathered, no_sync, prepare_frozen, prepare_trainable
from rlhf_fast.trainer.step_metrics import reduce_stats, rollout_metrics

# fields a resumed run may change without a warning
FREE_ON_RESUME = {"resume_from", "overwrite_output_dir", "total_steps", "output_dir", "save_steps",
                  "keep_checkpoints", "progress_bar", "tensorboard", "plot", "device", "distributed_strategy",
                  "frozen_model_sharding", "dist_timeout_s", "eval_steps"}


class RLTrainer(Runtime):
    """Base of PPOTrainer / GRPOTrainer (see their docstrings for the arguments).

    Hooks: ``compute_advantages(batch)``, ``compute_loss(micro_batch) -> (loss, stats)``,
    ``after_step(batch, metrics)``; class attributes ``uses_value_head``, properties
    ``uses_reference`` and ``updates_per_rollout``.

    Optional: ``gold_fn(prompts, completions)`` (a held-out / gold reward never optimised: logged
    as ``reward/gold`` and ``reward/proxy_minus_gold``) and ``eval_prompts`` (held-out prompts scored
    every ``config.eval_steps`` steps and at the end; see health.py).

    ``prompts``: strings (already formatted, e.g. ``encoding.policy_prompt``; reward functions see
    them as they are) or rows ``{"prompt": str | messages, **columns}`` (``data.load_prompt_rows``:
    formatted here with the chat template; reward functions get the raw prompt and the columns).
    ``reward_fn``: a function, or a list of them weighted by ``reward_weights`` (each then logged
    as ``reward/<name>/mean``); see ``reward_fns.py``. Completions stop at the stop tokens
    (``stops.py``), which the export writes into generation_config.json."""

    config_class = RLConfig
    uses_value_head = False

    def __init__(self, config, *, model, tokenizer, prompts, ref_model=None, reward_fn=None, reward_model=None,
                 gold_fn=None, eval_prompts=None):
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("pass exactly one of reward_fn (prompts, completions -> scores) and reward_model")
        if reward_fn is not None and not callable(reward_fn) and not isinstance(reward_fn, (list, tuple)):
            raise TypeError("reward_fn must be callable as reward_fn(prompts, completions, **columns), or a list")
        if tokenizer is None:
            raise ValueError("tokenizer is required (prompts are text; completions are decoded for reward_fn)")
        if gold_fn is not None and not callable(gold_fn):
            raise TypeError("gold_fn must be callable as gold_fn(prompts, completions)")
        if eval_prompts is not None and (isinstance(eval_prompts, str) or not len(eval_prompts)
                                         or not all(isinstance(p, str) for p in eval_prompts)):
            raise ValueError("eval_prompts must be a non-empty list of strings (or None)")
        self.gold_fn = gold_fn
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else None
        self.setup_runtime(config)
        cfg = config
        cfg.check_world_size(self.world_size)

        # the policy (+ value head), with LoRA adapters when the config asks (lora.py) ...
        if not isinstance(model, PolicyValueModel):
            model = PolicyValueModel(apply_lora(model, cfg), value_head=self.uses_value_head)
        else:
            model.policy = apply_lora(model.policy, cfg)
        if self.uses_value_head and model.value_head is None:
            raise ValueError(f"{type(self).__name__} needs a PolicyValueModel with a value head")
        # ... the frozen reference: the initial policy unless given; with LoRA, the policy's own
        # base with its adapters disabled (ref_model None: no second copy of the weights)
        if isinstance(ref_model, PolicyValueModel):
            ref_model = ref_model.policy
        if ref_model is not None and ref_model is model.policy:
            raise ValueError("ref_model is the policy itself; pass a frozen copy, or None to copy the initial policy")
        if ref_model is None and not is_peft(model.policy):
            ref_model = copy.deepcopy(model.policy)
        self.aux_coef = router_aux_loss_coef(model.policy, cfg.router_aux_loss_coef)
        attn = resolve_attn_implementation(cfg.attn_implementation, self.device, model.policy.config)
        for m in (model.policy, model.critic, ref_model):
            if m is not None and hasattr(m, "set_attn_implementation") and m.config._attn_implementation != attn:
                m.set_attn_implementation(attn)
        self.ref_model = self._frozen(ref_model) if ref_model is not None else None
        self.reward_model = self._frozen(reward_model) if reward_model is not None else None
        self.reward_fn = None if reward_fn is None else RewardFunctions(reward_fn, cfg.weights)
        if reward_fn is None and cfg.weights is not None:
            raise ConfigError("reward_weights: set without reward functions (the reward model has no weights)")
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if model.value_head is not None and not self.uses_value_head:
            model.value_head.requires_grad_(False)  # never in the loss (DDP refuses unused parameters)
        # self.model: the PolicyValueModel (FSDP-sharded in place); self.train_model: what the
        # loss's forward goes through (self.model, or its DDP wrapper)
        self.prepare_precision(model)
        self.model, self.train_model = prepare_trainable(model.train(), cfg.distributed_strategy, self.device)

        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = special_ids(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, model.policy, cfg.stop_tokens)
        self.prompts, self.raw_prompts, self.columns = prompt_rows(tokenizer, prompts)
        self.prompt_ids = encode_prompts(tokenizer, self.prompts, cfg.max_prompt_length, cfg.prompt_truncation)
        limit = getattr(model.policy.config.get_text_config(), "max_position_embeddings", None)
        longest = max(len(p) for p in self.prompt_ids)
        if limit is not None and longest + cfg.max_new_tokens > limit:
            raise ConfigError(f"max_new_tokens: the longest prompt ({longest} tokens, at most max_prompt_length="
                             f"{cfg.max_prompt_length}) + max_new_tokens={cfg.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={limit}")

        self.completions_per_prompt = cfg.sequences_per_step // cfg.rollout_batch_size  # GRPO: group_size
        self.total_optimizer_steps = cfg.total_steps * self.updates_per_rollout * (
            cfg.sequences_per_step // cfg.mini_batch_size)
        self.build_optimizer([p for p in self.model.parameters() if p.requires_grad], self.total_optimizer_steps)
        self.init_state()
        self.start_run()

    # ------------------------------------------------------------------ hooks
    @property
    def updates_per_rollout(self) -> int:
        """Passes over a step's sequences."""
        raise NotImplementedError

    @property
    def uses_reference(self) -> bool:
        """Whether the experience needs the frozen reference's log-probs."""
        return True

    @property
    def records_sampler_logprobs(self) -> bool:
        """Whether rollouts keep the sampler's own log-probs (``Rollout.sampler_logprobs``)."""
        return False

    @property
    def uses_sampler_logprobs_as_old(self) -> bool:
        """Whether the sampler's log-probs stand in for the old ones (no old-log-prob forward)."""
        return False

    def init_state(self) -> None:
        """Trainer-specific state that checkpoints hold (created before a resume)."""

    def compute_advantages(self, batch: Rollout) -> None:
        raise NotImplementedError

    def compute_loss(self, mb: Rollout):
        raise NotImplementedError

    def after_step(self, batch: Rollout, metrics: dict) -> None:
        """Adds to / acts on a finished step's metrics (before they are logged)."""

    def policy_forward(self, mb: Rollout, *, with_values: bool = True, return_hidden: bool = False):
        """(logits, values or None, router aux loss or None) of a micro-batch, under autocast
        (the aux loss only for a mixture-of-experts policy with ``aux_coef > 0``);
        ``return_hidden``: the LM head's inputs (``lm_head.HeadInputs``) instead of the logits."""
        kw = dict(with_values=with_values, return_hidden=return_hidden)
        with self.autocast():
            if self.aux_coef > 0:
                return self.train_model(mb.input_ids, mb.attention_mask, mb.response_start, with_aux=True, **kw)
            out, values = self.train_model(mb.input_ids, mb.attention_mask, mb.response_start, **kw)
        return out, values, None

    def add_router_aux(self, loss: torch.Tensor, aux, stats: dict) -> torch.Tensor:
        """``loss + aux_coef * aux`` (logged as ``loss/router_aux``); ``loss`` when aux is None."""
        if aux is None:
            return loss
        loss = loss + self.aux_coef * aux
        stats["loss/router_aux"], stats["loss/total"] = aux.detach(), loss.detach()
        return loss

    def _frozen(self, m: nn.Module) -> nn.Module:
        disable_dropout(m)
        m = self.frozen_dtype(m.eval().requires_grad_(False))
        return prepare_frozen(m, self.config.frozen_model_sharding, self.device)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.config
        with self.metrics_logger(cfg.total_steps) as log:
            for step in range(self.step, cfg.total_steps):
                t0 = time.perf_counter()
                batch = self.make_experience(step)
                self.compute_advantages(batch)
                t1 = time.perf_counter()
                stats = self.update(batch, step)
                t2 = time.perf_counter()
                metrics = {**self.rollout_metrics(batch, t1 - t0, t2 - t1), **stats}
                self.after_step(batch, metrics)
                self.step = step + 1
                if self.eval_prompts and (self.step == cfg.total_steps or
                                          (cfg.eval_steps and self.step % cfg.eval_steps == 0)):
                    metrics.update(evaluate_prompts(self, self.eval_prompts, self.step))
                log.log(self.step, metrics)
                self.maybe_save()
        self.export()

    def maybe_save(self) -> None:
        """Checkpoints every ``save_steps`` steps and at the last one (a hook: the demo evaluates here)."""
        cfg = self.config
        if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.total_steps:
            self.save()

    # ------------------------------------------------------------------ 1. experience
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

    def sample(self, step: int, repeat: int = 1, stream: int = 0) -> Rollout:
        """Samples ``repeat`` completions for each of this rank's prompts of the step (the r-th of
        ``world_size`` contiguous shares; copies consecutive, so a group stays on its rank) and
        scores them. ``stream`` > 0: another draw of prompts for the same step (a seeded
        permutation per (step, stream); dynamic sampling's refills)."""
        cfg = self.config
        share = cfg.rollout_batch_size // self.world_size
        prompts = self.prompt_indices(step)
        if stream:
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 65_537 + 7919 * stream)
            prompts = torch.randperm(len(self.prompts), generator=g).tolist()
            prompts = (prompts * (cfg.rollout_batch_size // len(prompts) + 1))[: cfg.rollout_batch_size]
        mine = prompts[self.rank * share : (self.rank + 1) * share]
        idx = [i for i in mine for _ in range(repeat)]
        if self.world_size > 1:  # a sampling stream per (step, rank), whatever happened before
            torch.manual_seed(((cfg.seed * 1_000_003 + step) * 65_537 + self.rank + 1_000_033 * stream) % 2**63)
        with gathered(self.model, within=self.model.policy), gathered(self.reward_model, full=False):
            try:
                return sample_rollout(
                    self.model.policy, self.tokenizer, [self.prompts[i] for i in idx], [self.prompt_ids[i] for i in idx],
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, device=self.device,
                    reward_fn=self.reward_fn, reward_model=self.reward_model,
                    missing_eos_penalty=cfg.missing_eos_penalty, autocast=self.autocast, stop_ids=self.stop_ids,
                    raw_prompts=[self.raw_prompts[i] for i in idx],
                    columns={k: [v[i] for i in idx] for k, v in self.columns.items()},
                    record_logprobs=self.records_sampler_logprobs)
            except RewardFunctionError as e:  # name the step too
                raise RewardFunctionError(f"step {step + 1}: {e}") from e.__cause__
            except RuntimeError as e:  # torch.multinomial on NaN / inf probabilities: a diverged or corrupt policy
                if "probability tensor contains" not in str(e):
                    raise
                self.stop_non_finite(step + 1, "the policy's next-token probabilities are not finite while sampling "
                                               "(NaN / inf weights or activations)")

    def make_experience(self, step: int, batch: Rollout | None = None) -> Rollout:
        """Samples this rank's rollout (or takes ``batch``, already sampled and scored) and adds,
        under no_grad, the policy's log-probs at the sampling temperature (the "old" ones), its
        values (with a value head) and the reference's log-probs (when ``uses_reference``).
        With ``uses_sampler_logprobs_as_old`` (no value head) the sampler's log-probs are the old
        ones and the policy's forward is skipped."""
        cfg = self.config
        if batch is None:
            batch = self.sample(step, repeat=self.completions_per_prompt)
        kw = dict(temperature=cfg.temperature, micro_batch_size=cfg.micro_batch_size, autocast=self.autocast,
                  lm_head=cfg.lm_head)
        if self.uses_sampler_logprobs_as_old and not self.uses_value_head and batch.sampler_logprobs is not None:
            batch.logprobs = batch.sampler_logprobs
        else:
            batch.logprobs, values = rollout_logprobs(self.model, batch, with_values=self.uses_value_head, **kw)
            if self.uses_value_head:
                batch.values = values
        if self.uses_reference and self.ref_model is None:  # LoRA: the base model, adapters off
            with adapters_disabled(self.model.policy):
                batch.ref_logprobs = rollout_logprobs(self.model, batch, **kw)[0]
        elif self.uses_reference:
            with gathered(self.ref_model, full=False):
                batch.ref_logprobs = rollout_logprobs(self.ref_model, batch, **kw)[0]
        for name in ("logprobs", "values", "ref_logprobs"):
            if getattr(batch, name) is not None:
                self.check_finite(name, getattr(batch, name), step + 1)
        return batch

    def check_finite(self, name: str, x: torch.Tensor, step: int) -> None:
        """Stops the run (every rank) when a rollout quantity holds NaN/Inf on any rank (one host sync)."""
        bad = int(all_reduce((~torch.isfinite(x)).sum()))
        if bad:
            self.stop_non_finite(step, f"{name} has {bad} non-finite value(s)")

    # ------------------------------------------------------------------ 2. advantages: global rows
    def global_batch(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's rows of each (B, ...) tensor, in rank order (the global batch; response
        columns padded to the longest rank's): advantages are computed on it, then ``own_rows``."""
        width = global_max(xs[0].shape[1]) if xs[0].dim() > 1 else None
        return [gather_rows(x, width if x.dim() > 1 else None) for x in xs]

    def own_rows(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's rows (and ``like``'s columns) of a global-batch tensor."""
        n = like.shape[0]
        x = x[self.rank * n : (self.rank + 1) * n]
        return x[:, : like.shape[1]] if x.dim() > 1 and like.dim() > 1 else x

    # ------------------------------------------------------------------ 3. update
    def update(self, batch: Rollout, step: int) -> dict:
        """``updates_per_rollout`` passes over shuffled mini-batches, one optimizer step each;
        returns the mean stats and grad norm."""
        stats, grad_norms = [], []
        for _ in range(self.updates_per_rollout):
            for mini in self.mini_batches(len(batch)):
                s, grad_norm = self.optimize_mini_batch(batch, mini, step)
                stats += s
                grad_norms.append(grad_norm)
        out = self.reduce_stats(stats)
        out["grad_norm"] = torch.stack(grad_norms).mean().item()
        return out

    def mini_batches(self, n: int) -> list[torch.Tensor]:
        """This rank's rows (of its ``n``) in each mini-batch of one shuffled pass over the step's
        sequences (stratified, see the module docstring; the same on every rank)."""
        return [m.to(self.device) for m in mini_batch_indices(n, self.config.mini_batch_size, self.generator,
                                                              self.rank, self.world_size)]

    def micro_batches(self, batch: Rollout, mini: torch.Tensor):
        """Yields (micro_batch, scale) of mini-batch ``mini``: ``minibatch.micro_batches`` with
        this trainer's ``loss_agg`` and sizes."""
        return micro_batches(batch, mini, self.config)

    def optimize_mini_batch(self, batch: Rollout, mini: torch.Tensor, step: int):
        """One optimizer step on mini-batch ``mini``: forward/backward per micro-batch (gradients
        accumulate; DDP all-reduces at the last one only), then ``optimizer_step`` on the global
        mini-batch loss. Returns (per-micro-batch stats, grad norm)."""
        micros = list(self.micro_batches(batch, mini))
        loss_sum = torch.zeros((), device=self.device)
        stats = []
        for i, (micro, scale) in enumerate(micros):
            with no_sync(self.train_model, skip=i < len(micros) - 1):
                loss, s = self.compute_loss(micro)
                self.backward(loss * scale)
            loss_sum = loss_sum + loss.detach() * scale
            stats.append(s)
        return stats, self.optimizer_step(step, all_reduce(loss_sum) / self.world_size)

    # ------------------------------------------------------------------ metrics (step_metrics.py)
    reduce_stats = staticmethod(reduce_stats)

    def rollout_metrics(self, batch: Rollout, t_rollout: float, t_update: float) -> dict:
        """``step_metrics.rollout_metrics`` of this step's batch, with this trainer's device,
        learning rate, group size, ``max_new_tokens`` and ``gold_fn``."""
        return rollout_metrics(batch, t_rollout, t_update, device=self.device, lr=self.scheduler.get_last_lr()[0],
                               group_size=self.completions_per_prompt, max_new_tokens=self.config.max_new_tokens,
                               gold_fn=self.gold_fn)

    # ------------------------------------------------------------------ resume
    def check_resumed(self, path, state: dict) -> None:
        """Warns about config fields that changed since the checkpoint was written."""
        saved = state.get("config", {})
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k in saved and saved[k] != v and k not in FREE_ON_RESUME)
        if changed and self.rank == 0:
            warnings.warn(f"resuming {path} with changed config fields: "
                          + ", ".join(f"{k}={saved[k]!r} -> {getattr(self.config, k)!r}" for k in changed))

