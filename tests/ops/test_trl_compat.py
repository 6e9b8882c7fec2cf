"""rlhf_fast.GRPOLoss against TRL's GRPOTrainer loss on the same inputs, and the TRL example.

TRL's loss math is run unmodified: ``TRLLossOnly`` is a GRPOTrainer built without its heavy
constructor, whose per-token log-probs come from the same logits we feed to GRPOLoss, so
the two losses and their gradients w.r.t. the logits can be compared directly.
"""
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from helpers import assert_close_to_ref  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import rlhf_fast  # noqa: E402


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


class TRLLossOnly(GRPOTrainer):
    """TRL's ``_compute_loss`` with the model replaced by fixed logits (B, T, V)."""

    def __init__(self, logits, *, loss_type, epsilon, epsilon_high, beta, temperature, max_completion_length, delta):
        self.logits, self.temperature = logits, temperature
        self.loss_type, self.beta = loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high
        self.max_completion_length = max_completion_length
        self.args = SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1)
        self.importance_sampling_level = "token"
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.use_vllm = self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.model = torch.nn.Linear(1, 1)  # only .training is read
        self.accelerator = _Accelerator()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logp_all = torch.log_softmax(self.logits / self.temperature, -1)
        targets = input_ids[:, -logits_to_keep:]
        logps = logp_all.gather(-1, targets[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logps, entropy, None


def _batch(B=6, T=9, V=301, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    completion_ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # right padding after EOS, >= 1 token per row
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    inputs = {
        "prompt_ids": torch.randint(0, V, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": logp + 0.3 * torch.randn(B, T, generator=g),
        "ref_per_token_logps": logp + 0.2 * torch.randn(B, T, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    return logits, inputs


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("beta,temperature,delta", [(0.0, 1.0, None), (0.04, 0.8, 3.0)])
def test_grpo_loss_matches_trl(backend, loss_type, beta, temperature, delta):
    logits, inputs = _batch(seed=hash((loss_type, beta)) % 2**31)
    opts = dict(epsilon=0.2, epsilon_high=0.28, beta=beta, temperature=temperature, max_completion_length=12,
                delta=delta)

    def trl_loss(dtype):
        """TRL's loss and grad_logits, its math run in ``dtype`` (float64: the ground truth)."""
        x_trl = logits.detach().to(dtype).clone().requires_grad_()
        trainer = TRLLossOnly(x_trl, loss_type=loss_type, **opts)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        loss = trainer._compute_loss(trainer.model, cast)
        loss.backward()
        return loss.detach(), x_trl.grad, trainer._metrics["train"]

    loss64, grad64, metrics64 = trl_loss(torch.float64)
    loss32, grad32, _ = trl_loss(torch.float32)

    x = logits.detach().clone().requires_grad_()
    ours = rlhf_fast.GRPOLoss(loss_type, **opts)
    loss, stats = ours(x, inputs["completion_ids"], inputs["old_per_token_logps"], inputs["advantages"],
                       inputs["completion_mask"], inputs["ref_per_token_logps"] if beta else None)
    loss.backward()

    # ours vs TRL in float64, with TRL's own float32 error as the yardstick plus the fp32 allowance
    # of tests/test_policy_loss.py (LOSS_ATOL / GRAD_ATOL there)
    assert_close_to_ref(loss.detach(), loss64, loss32, atol=4e-6 * max(1.0, abs(float(loss64))),
                        name=f"{loss_type} loss")
    scale = float(grad64.abs().max())
    assert_close_to_ref(x.grad, grad64, grad32, atol=2e-6 * scale, name=f"{loss_type} grad_logits")
    assert abs(float(stats["clip_frac"]) - metrics64["clip_ratio/region_mean"][0]) < 1e-6


def test_example_trains_with_trl(tmp_path):
    """examples/trl_grpo_with_rlhf_fast.py: two optimizer steps of TRL's GRPOTrainer with our loss,
    with rollouts reused (old log-probs != current) and a KL to a reference model."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        from trl_grpo_with_rlhf_fast import build_trainer
    finally:
        sys.path.pop(0)
    trainer = build_trainer(steps=2, loss_type="grpo", beta=0.04, num_iterations=2, output_dir=str(tmp_path))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    calls = []
    real = trainer.rlhf_fast_loss.forward
    trainer.rlhf_fast_loss.forward = lambda *a: calls.append(a[2] is not None) or real(*a)
    trainer.train()
    assert len(calls) >= 2 and any(calls), "the rlhf_fast loss was not used (or never with old log-probs)"
    moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.model.parameters()))
    assert moved, "no parameter changed after two steps"
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert logged and all(torch.isfinite(torch.tensor(row["loss"])) for row in logged)
