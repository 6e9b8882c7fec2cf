"""What every trainer (PPO, GRPO, SFT, reward model) runs on: joining the torchrun job, the
device, seeding, bf16 autocast, AdamW with a warmup + decay schedule, the optimizer step with
its non-finite guard, the output folder, metrics, and checkpoint save / resume.

    class MyTrainer(Runtime):
        def __init__(self, config, model):
            self.setup_runtime(config)                      # rank, world, device, seeds, output_dir
            self.model = model.to(self.device)
            self.build_optimizer(self.model.parameters(), total_steps=...)
            self.start_run()                                # refuses a used output_dir; resumes
        ... loss.backward(); self.optimizer_step(step, loss.detach()) ...

A trainer provides ``config`` (a RunConfig), ``model``, ``tokenizer`` (for the export) and may
override ``extra_state`` / ``load_extra_state`` (its own checkpointed state) and
``check_resumed`` (what to say about a resumed checkpoint).
"""
from __future__ import annotations

import functools
import math
import random
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.trainer import checkpoint as ckpt
from rlhf_fast.trainer.collectives import broadcast_object
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.hf_io import is_peft
from rlhf_fast.trainer.metrics import JSONL, MetricsLogger
from rlhf_fast.trainer.process_group import init_distributed, is_distributed, rank, rank_device, world_size
from rlhf_fast.trainer.sharding import local_tensor


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the run stops before the optimizer step."""


class OutputDirInUseError(FileExistsError):
    """A fresh run was pointed at an output_dir that holds another run."""


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


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


def run_in_progress(output_dir) -> str | None:
    """What ``output_dir`` holds of an earlier run (metrics, checkpoints or a final export), or
    None when it holds none."""
    out = Path(output_dir)
    found = [name for name in (JSONL, "checkpoints", "final") if (out / name).exists()]
    return ", ".join(found) if found else None


class Runtime:
    """The shared runtime of the trainers (module docstring)."""

    # ------------------------------------------------------------------ setup
    def setup_runtime(self, cfg) -> None:
        """Joins the torchrun job (a no-op outside one), picks this rank's device, seeds every RNG
        from ``cfg.seed`` and sets the output and checkpoint folders."""
        self.config = cfg
        init_distributed(cfg.device, cfg.dist_timeout_s)
        self.rank, self.world_size = rank(), world_size()
        self.device = rank_device(cfg.device) if is_distributed() else resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # mini-batch shuffling
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.step = 0

    def autocast(self):
        """bf16 autocast on CUDA ("auto" / "bf16"), and on CPU only with precision="bf16"; fp16
        autocast with precision="fp16" (the optimizer step then unscales a scaled loss)."""
        p, dev = self.config.precision, self.device.type
        dtype = torch.float16 if p == "fp16" else torch.bfloat16
        return torch.autocast(dev, dtype=dtype, enabled=p in ("bf16", "fp16") or (p == "auto" and dev == "cuda"))

    def prepare_precision(self, model: nn.Module) -> nn.Module:
        """``master_weights="fp32"``: the trainable floating-point parameters become fp32 in place
        (a bf16 checkpoint is upcast; frozen ones, e.g. a LoRA base, keep their dtype), so the
        optimizer's state is fp32 and an update at lr 1e-6 is not lost to bf16 rounding while
        the forward computes in ``precision`` under autocast."""
        if self.config.master_weights == "fp32":
            for p in model.parameters():
                if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        return model

    def frozen_dtype(self, model: nn.Module) -> nn.Module:
        """A frozen (reference / reward) model in ``config.frozen_dtype`` ("auto": as it is)."""
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(self.config.frozen_dtype)
        return model.to(dt) if dt is not None else model

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the fp16 loss scaler when precision="fp16"."""
        scaler = getattr(self, "scaler", None)
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def build_optimizer(self, params, total_steps: int) -> None:
        """AdamW over ``params`` and the LR schedule (``lr_multiplier``) over ``total_steps``
        optimizer steps."""
        cfg = self.config
        params, impl = list(params), cfg.adam_impl
        # auto: fused where torch has the kernel (CPU / CUDA floating-point params), else torch's own default
        fused = impl == "fused" or (impl == "auto" and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params))
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused or None,
                                           foreach={"foreach": True, "for_loop": False}.get(impl))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_multiplier, warmup=cfg.warmup_steps, total=total_steps, schedule=cfg.lr_scheduler,
            min_ratio=cfg.min_lr_ratio))
        # fp16 has too few exponent bits for small gradients: the loss is scaled (and unscaled in optimizer_step)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None

    def start_run(self) -> None:
        """Resumes ``config.resume_from``, or starts fresh: then ``output_dir`` must not hold
        another run unless ``overwrite_output_dir`` (checked on rank 0, decided on every rank)."""
        cfg = self.config
        if cfg.resume_from:
            self.resume(cfg.resume_from)
            return
        used = run_in_progress(self.output_dir) if self.rank == 0 and not cfg.overwrite_output_dir else None
        used = broadcast_object(used)
        if used:
            raise OutputDirInUseError(
                f"output_dir {self.output_dir} already holds a run ({used}); set resume_from='latest' to "
                "continue it, overwrite_output_dir=true to replace it, or choose another output_dir")

    # ------------------------------------------------------------------ optimizer step
    def optimizer_step(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Clips the gradients, checks the global ``loss`` (the same on every rank) and the gradient
        norm are finite (one host sync), steps the optimizer and the LR schedule; returns the norm."""
        cfg = self.config
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        scaler = getattr(self, "scaler", None)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        grad_norm = local_tensor(grad_norm)  # FSDP: the global norm, as a replicated DTensor
        if scaler is not None and bool(torch.isfinite(loss)) and not bool(torch.isfinite(grad_norm)):
            scaler.update()  # an fp16 overflow of the scaled gradients: skip this step, halve the scale
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm.detach()
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            what = "loss" if not bool(torch.isfinite(loss)) else "gradient norm"
            self.optimizer.zero_grad(set_to_none=True)
            self.stop_non_finite(step + 1, f"non-finite {what} (loss {float(loss)}, grad norm {float(grad_norm)}); "
                                           "stopped before the optimizer step")
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def stop_non_finite(self, step: int, what: str):
        try:
            latest = ckpt.latest_checkpoint(self.checkpoint_dir)
        except (ckpt.CorruptCheckpointError, FileNotFoundError):
            latest = None
        raise NonFiniteError(f"step {step}: {what}. Nothing was saved for this step; the last good checkpoint is "
                             f"{latest if latest is not None else 'none (no checkpoint saved yet)'}")

    # ------------------------------------------------------------------ metrics, checkpoints, export
    def metrics_logger(self, total_steps: int | None = None, **kw) -> MetricsLogger:
        """The run's MetricsLogger (rank 0 writes), from the current step."""
        cfg = self.config
        total_steps = total_steps if total_steps is not None else getattr(self, "total_steps", None) or cfg.total_steps
        return MetricsLogger(self.output_dir, total_steps, start_step=self.step, progress=cfg.progress_bar,
                             tensorboard=cfg.tensorboard, plot=cfg.plot, desc=type(self).__name__, **kw)

    def extra_state(self) -> dict:
        """Hook: trainer-specific state the checkpoints hold."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Hook: restores what ``extra_state`` returned."""

    def check_resumed(self, path: Path, state: dict) -> None:
        """Hook: called after a resume from ``path`` with its trainer state."""

    def save(self) -> Path | None:
        """Atomic checkpoint of model, optimizer, scheduler, RNGs and ``extra_state()`` at the
        current step (every rank calls it; rank 0 writes and gets the path, the others None)."""
        state = {"config": self.config.to_dict(), "world_size": self.world_size, **self.extra_state()}
        if getattr(self, "scaler", None) is not None:  # fp16: the loss scale resumes where it was
            state["grad_scaler"] = self.scaler.state_dict()
        return ckpt.save_checkpoint(self.checkpoint_dir, self.step, model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, state=state, generators={"shuffle": self.generator},
                                    keep_last=self.config.keep_checkpoints)

    def resume(self, where: str) -> None:
        """Restores a checkpoint: ``where`` is "latest" (this run's newest verified one; a fresh
        start when there is none) or a checkpoint folder."""
        path = None
        if self.rank == 0:  # rank 0 alone needs to see the files
            path = ckpt.latest_checkpoint(self.checkpoint_dir) if where == "latest" else Path(where)
        path = broadcast_object(path)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     generators={"shuffle": self.generator}, map_location=self.device)
        self.step = int(state["step"])
        if getattr(self, "scaler", None) is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.load_extra_state(state)
        self.check_resumed(path, state)

    def export(self, path=None) -> Path:
        """Writes the model (``save_pretrained``; a PolicyValueModel with its value head) and the
        tokenizer to ``path`` (default ``output_dir/final``), with the trainer's stop ids (``stop_ids``,
        see ``stops.py``) in its generation_config.json: every rank calls it, rank 0 writes."""
        path = Path(path) if path is not None else self.output_dir / "final"
        stop_ids = getattr(self, "stop_ids", None)
        out = ckpt.export_pretrained(self.model, path, self.tokenizer, stop_ids)
        lm = getattr(self.model, "policy", self.model)
        if self.config.lora_export_merged and is_peft(lm) and self.world_size > 1:
            if self.rank == 0:
                warnings.warn("lora_export_merged: skipped under torchrun (the model is sharded); merge the exported "
                              "adapter in one process: PeftModel.from_pretrained(base, path).merge_and_unload()",
                              stacklevel=2)
        elif self.config.lora_export_merged and is_peft(lm):  # ``path / "merged"``: full weights
            from rlhf_fast.trainer.lora import export_merged

            export_merged(lm, path / "merged", self.tokenizer, stop_ids)
        return out
