"""The loop shared by the supervised stages (SFT, reward model): a config, seeded batches,
micro-batch gradient accumulation, an LR schedule, evaluation, atomic checkpoints, metrics,
and a Hugging Face export. Subclasses say how to encode an example, weigh it, and score a
micro-batch (``encode``, ``weight``, ``compute_loss``).

    for step in range(start, total_steps):
        batch = seeded_permutation(epoch)[slice]                  # a function of the step alone
        for micro, share in micro_batches(batch):                 # share: its part of the batch's weight
            loss, stats = compute_loss(micro); (loss * share).backward()   # share: x world under torchrun
        clip; finite check; optimizer.step(); scheduler.step()
        log; evaluate every eval_steps; checkpoint every save_steps
    export(output_dir / "final")                                  # model.save_pretrained + tokenizer

Under torchrun (``WORLD_SIZE > 1``) the trainer joins the job and trains on PyTorch's FSDP2
(``distributed_strategy="fsdp"``, per transformer block and root) or DDP (``"ddp"``); see
``sharding.py``. Setup, the optimizer step, checkpoints and the export are the shared runtime's
(``runtime.py``). Every rank draws the same global batch and takes its contiguous share
(``ceil(B / world)`` examples); ranks run equally many micro-batches (a rank with nothing left
runs a zero-weight one, since FSDP's collectives happen inside each forward) and each scales its
micro-batch loss by ``world * weight(micro) / weight(global batch)`` (DDP / FSDP average the
ranks' gradients), so the update is that of one process on the global batch: SFT's token-mean
NLL over the batch's response tokens, the reward model's mean over its pairs. Metrics and
evaluation (the eval set split the same way) are global sums; only rank 0 logs and writes.
Checkpoints hold the full state, so any world size resumes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf_fast.trainer.collectives import all_reduce
from rlhf_fast.trainer.config import RunConfig, check_field
from rlhf_fast.trainer.lora import apply_lora
from rlhf_fast.trainer.model import PolicyValueModel, resolve_attn_implementation, router_aux_loss_coef
from rlhf_fast.trainer.runtime import Runtime
from rlhf_fast.trainer.sharding import CallThrough, no_sync, prepare_trainable


@dataclass
class SupervisedConfig(RunConfig):
    """Fields of the supervised stages (and those of RunConfig). A *step* is one optimizer step
    on ``batch_size`` examples (SFT: sequences, reward model: preference pairs)."""

    output_dir: str = "runs/supervised"
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    micro_batch_size: int = 16
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16
    max_length: int = 512  # prompt + response tokens; longer responses are cut, prompts never
    eval_steps: int = 0  # evaluate every eval_steps steps (0: at the end only)
    eval_batch_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            check_field(self, name, getattr(self, name) >= 1, "must be >= 1")
        for name in ("max_steps", "eval_steps"):
            check_field(self, name, getattr(self, name) >= 0, "must be >= 0")
        check_field(self, "micro_batch_size", self.batch_size % self.micro_batch_size == 0,
               f"must divide batch_size={self.batch_size}")


class SupervisedTrainer(Runtime):
    """Base of SFTTrainer / RewardTrainer (see their docstrings for the arguments)."""

    config_class = SupervisedConfig
    primary_metric = "loss"  # the progress bar's eval figure
    lora_task_type = "CAUSAL_LM"  # the PEFT task type of the model LoRA wraps

    def __init__(self, config, *, model, tokenizer, train_data, eval_data=None):
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer is required (the data is text)")
        self.setup_runtime(config)
        cfg = config
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("tokenizer has neither a pad_token nor an eos_token to pad with")

        if isinstance(model, PolicyValueModel):  # a causal LM with a sequence-scoring head
            model.policy = apply_lora(model.policy, cfg)
        else:
            model = apply_lora(model, cfg, task_type=self.lora_task_type)
        self.aux_coef = router_aux_loss_coef(getattr(model, "policy", model), cfg.router_aux_loss_coef)
        attn = resolve_attn_implementation(cfg.attn_implementation, self.device, getattr(model, "config", None))
        lm = model.policy if isinstance(model, PolicyValueModel) else model
        if hasattr(lm, "set_attn_implementation") and lm.config._attn_implementation != attn:
            lm.set_attn_implementation(attn)
        if cfg.gradient_checkpointing:
            if isinstance(model, PolicyValueModel):
                model.gradient_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # self.model: the model itself (FSDP-sharded in place); self.train_model: what the loss's
        # forward goes through (FSDP / DDP act at a module's forward): CallThrough(model, model_loss)
        # or its DDP wrapper
        self.prepare_precision(model)
        self.net, self.train_model = prepare_trainable(
            CallThrough(model.train(), self._model_loss), cfg.distributed_strategy, self.device)
        self.model = self.net.module

        self.train_set = self._encode_all("train_data", train_data)
        self.eval_set = self._encode_all("eval_data", eval_data) if eval_data is not None else None
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        self.build_optimizer([p for p in self.model.parameters() if p.requires_grad], self.total_steps)
        self.start_run()

    # ------------------------------------------------------------------ subclass hooks
    def encode(self, example):
        """One raw example (a dict) -> what ``compute_loss`` takes."""
        raise NotImplementedError

    def weight(self, item) -> float:
        """How much ``item`` counts in the batch mean (SFT: its response tokens; RM: 1 per pair)."""
        return 1.0

    def model_loss(self, model, items):
        """(loss, stats) of a micro-batch computed with ``model``: loss is the weighted mean over
        ``items``; stats are 0-d tensors."""
        raise NotImplementedError

    def _model_loss(self, model, items):
        return self.model_loss(model, items)

    def compute_loss(self, items):
        """(loss, stats) of a micro-batch (``model_loss`` called through the FSDP / DDP module;
        every rank must call it equally often)."""
        return self.train_model(items)

    # ------------------------------------------------------------------ data
    def _encode_all(self, name, data):
        if isinstance(data, (str, bytes)) or not hasattr(data, "__len__"):
            raise TypeError(f"{name} must be a list of examples (dicts), got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError(f"{name} is empty")
        out = []
        for i, ex in enumerate(data):
            try:
                out.append(self.encode(ex))
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}[{i}]: {e}") from None
        return out

    def batch_indices(self, step: int) -> list[int]:
        """The examples of ``step``: a slice of a seeded permutation of the data per epoch."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g).tolist()
        bs = self.config.batch_size
        return perm[pos * bs : (pos + 1) * bs]

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        """Runs the remaining steps; returns the final evaluation (or the last training stats)."""
        cfg = self.config
        result = {}
        with self.metrics_logger(self.total_steps, progress_keys=("train/loss", f"eval/{self.primary_metric}")) as log:
            for step in range(self.step, self.total_steps):
                stats = self.train_step(step)
                self.step = step + 1
                metrics = {**stats, "lr": self.scheduler.get_last_lr()[0], "epoch": step / self.steps_per_epoch}
                last = self.step == self.total_steps
                if self.eval_set is not None and (last or (cfg.eval_steps and self.step % cfg.eval_steps == 0)):
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                result = log.log(self.step, metrics)
                if (cfg.save_steps and self.step % cfg.save_steps == 0) or last:
                    self.save()
        self.export()
        return result

    def rank_parts(self, items: list, size: int):
        """(part, weight) for each of this rank's parts of ``items`` (a list every rank holds):
        its contiguous share ``items[r*k : (r+1)*k]``, ``k = ceil(len / world)``, cut into parts of
        ``size``. Every rank gets ``ceil(k / size)`` parts; under a process group a part that is
        empty or weighs 0 is replaced by a zero-weight filler (an example of ``items`` with
        positive weight), so every rank runs as many forwards; alone such parts are skipped."""
        k = -(-len(items) // self.world_size)
        local = items[self.rank * k : (self.rank + 1) * k]
        filler = next((it for it in items if self.weight(it) > 0), items[0])
        for s in range(0, max(k, 1), size):
            part = local[s : s + size]
            w = sum(self.weight(it) for it in part)
            if w == 0:
                if self.world_size == 1:
                    continue
                part = [filler]
            yield part, w

    def train_step(self, step: int) -> dict:
        items = [self.train_set[i] for i in self.batch_indices(step)]
        total = max(sum(self.weight(it) for it in items), 1e-12)  # the global batch's weight
        parts = list(self.rank_parts(items, self.config.micro_batch_size))
        loss_sum = torch.zeros((), device=self.device)
        stats = []
        for i, (part, w) in enumerate(parts):
            share = w / total
            with no_sync(self.train_model, skip=i < len(parts) - 1):
                with self.autocast():
                    loss, st = self.compute_loss(part)
                self.backward(loss * (share * self.world_size))  # x world: DDP / FSDP average the ranks' gradients
            loss_sum = loss_sum + loss.detach() * share
            stats.append({k: v.detach().float() * share for k, v in st.items()})
        loss_sum = all_reduce(loss_sum)  # the global batch's loss, the same on every rank
        grad_norm = self.optimizer_step(step, loss_sum)
        keys = list(stats[0])
        sums = torch.stack([torch.stack([s[k] for s in stats]).sum() for k in keys] + [loss_sum.new_zeros(())])
        sums = all_reduce(sums[:-1]) if keys else sums[:0]  # loss_sum is already global
        values = torch.cat([sums, loss_sum.reshape(1), grad_norm.float().reshape(1)]).tolist()  # one host sync
        out = {f"train/{k}": v for k, v in zip(keys, values)}
        out["train/loss"], out["grad_norm"] = values[-2], values[-1]
        return out

    @torch.no_grad()
    def evaluate(self, data=None) -> dict:
        """Weighted means of the loss stats over ``data`` (raw examples; default: the eval set),
        over every rank's share of it. Under a process group every rank must call it."""
        items = self.eval_set if data is None else self._encode_all("data", data)
        if items is None:
            raise ValueError("no eval_data was given to the trainer and no data was passed to evaluate()")
        was_training = self.model.training
        self.model.eval()
        sums, total = {}, 0.0
        try:
            for part, w in self.rank_parts(items, self.config.eval_batch_size):
                with self.autocast():
                    loss, st = self.compute_loss(part)
                for k, v in {"loss": loss, **st}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * w
                total += w
        finally:
            self.model.train(was_training)
        keys = list(sums)
        local = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys]
                            + [torch.tensor(float(total), dtype=torch.float64, device=self.device)])
        glob = all_reduce(local)
        values = (glob[:-1] / glob[-1].clamp(min=1e-12)).tolist()
        return dict(zip(keys, values))
