"""Preference losses on sequence-level scalars: the Bradley-Terry reward-model loss and DPO / IPO.

O(B), plain torch (each is its own reference; autograd differentiates it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast import _backend
from rlhf_fast.ops._checks import (
    VALUE_DTYPES,
    check_choice,
    check_float,
    check_number,
    check_positive,
    check_same_device,
    check_shape,
)

LAUNCHERS: dict = {}  # no kernels: plain torch (the "torch" backend) is the implementation


def reward_model_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                      margin: float | torch.Tensor | None = None,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry reward-model loss::

        loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()
        accuracy = (chosen_rewards > rejected_rewards).float().mean()

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the preferred / rejected responses.
        margin: None, a float, or a (B,) tensor (Llama-2 style preference margin).
        backend: None | "torch" (plain torch is this op's only implementation).
    Returns: (loss 0-d, accuracy 0-d), both tensors.
    """
    check_float("chosen_rewards", chosen_rewards, VALUE_DTYPES)
    if chosen_rewards.dim() != 1 or chosen_rewards.numel() == 0:
        raise ValueError(f"chosen_rewards must have shape (B,) with B > 0, got {tuple(chosen_rewards.shape)}")
    check_float("rejected_rewards", rejected_rewards, VALUE_DTYPES)
    check_shape("rejected_rewards", rejected_rewards, chosen_rewards.shape, "chosen_rewards' shape")
    check_same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      margin=margin if isinstance(margin, torch.Tensor) else None)
    if backend is not None:  # RLHF_FAST_BACKEND does not apply: there is nothing to choose
        _backend.select_backend(chosen_rewards.device, LAUNCHERS, backend=backend)
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    diff = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            check_float("margin", margin, VALUE_DTYPES)
            if margin.dim() != 0:
                check_shape("margin", margin, chosen_rewards.shape, "one margin per pair")
            diff = diff - margin.to(dtype)
        else:
            diff = diff - check_number("margin", margin)
    loss = -F.logsigmoid(diff).mean()
    accuracy = (chosen_rewards.detach() > rejected_rewards.detach()).to(dtype).mean()
    return loss, accuracy


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (sigmoid, with conservative label smoothing) or IPO loss on sequence log-probs::

        h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        # length-normalised (chosen_lengths / rejected_lengths given: TRL's "sigmoid_norm" and its "ipo"):
        h = (policy_chosen_logps - ref_chosen_logps) / chosen_lengths
            - (policy_rejected_logps - ref_rejected_logps) / rejected_lengths
        sigmoid: loss = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                         - F.logsigmoid(-beta * h) * label_smoothing).mean()
        ipo:     loss = ((h - 1 / (2 * beta)) ** 2).mean()
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()   (rejected likewise)

    Args: four (B,) tensors of summed response log-probs; beta > 0; label_smoothing in [0, 0.5)
    (sigmoid only); chosen_lengths, rejected_lengths: None, or both (B,) response token counts
    (> 0) that divide each side's log-ratio (the rewards stay unnormalised); backend: None | "torch"
    (plain torch is this op's only implementation).
    Returns (loss 0-d, chosen_rewards (B,), rejected_rewards (B,)).
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    check_float(names[0], tensors[0], VALUE_DTYPES)
    if tensors[0].dim() != 1 or tensors[0].numel() == 0:
        raise ValueError(f"policy_chosen_logps must have shape (B,) with B > 0, got {tuple(tensors[0].shape)}")
    for n, t in zip(names[1:], tensors[1:]):
        check_float(n, t, VALUE_DTYPES)
        check_shape(n, t, tensors[0].shape, "policy_chosen_logps' shape")
    check_same_device(**dict(zip(names, tensors)))
    if backend is not None:  # RLHF_FAST_BACKEND does not apply: there is nothing to choose
        _backend.select_backend(tensors[0].device, LAUNCHERS, backend=backend)
    beta = check_positive("beta", beta)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    label_smoothing = check_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing != 0:
        raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths must be given together (or neither)")
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    pc, pr, rc, rr = (t.to(dtype) for t in tensors)
    chosen, rejected = pc - rc, pr - rr
    h = chosen - rejected
    if chosen_lengths is not None:
        for n, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{n} must be a tensor, got {type(t).__name__}")
            check_shape(n, t, tensors[0].shape, "policy_chosen_logps' shape")
            check_same_device(policy_chosen_logps=tensors[0], **{n: t})
            if not bool(((t > 0) & torch.isfinite(t.float())).all()):  # one host sync per call
                raise ValueError(f"{n} must be positive finite token counts")
        h = chosen / chosen_lengths.to(dtype) - rejected / rejected_lengths.to(dtype)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * chosen.detach(), beta * rejected.detach()
