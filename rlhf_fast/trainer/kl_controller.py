"""The coefficient of the KL penalty in PPO's rewards: fixed, or adaptive (Ziegler et al. 2019).

Adaptive rule, applied once per step with the measured KL to the reference (summed over each
completion's tokens, averaged over the batch) and the number of sequences n it was measured on::

    error = clamp(kl / target - 1, -0.2, 0.2)
    kl_coef = kl_coef * (1 + error * n / horizon)

so the coefficient grows while the policy drifts further than ``target`` nats and shrinks
while it stays closer, at a pace set by ``horizon`` (in sequences).
"""
from __future__ import annotations

import math


class KLController:
    """``value`` is the current coefficient; ``update`` adapts it when ``target`` is given."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        if not math.isfinite(init_kl_coef) or init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be a finite number >= 0, got {init_kl_coef}")
        if target is not None and not target > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, n_sequences: int) -> float:
        """Adapts the coefficient to the measured ``kl``; returns the new value."""
        if self.adaptive:
            if not math.isfinite(kl):
                raise ValueError(f"kl must be finite to adapt the KL coefficient, got {kl}")
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_sequences / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
