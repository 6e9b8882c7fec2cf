"""Reward functions in the RL trainers: TRL's calling convention, several functions with weights.

    f(prompts, completions, **columns) -> list[float | None]      # one value per sample

``prompts`` are the raw prompts of the prompt rows (strings, or lists of messages);
``completions`` the decoded completions (for a conversational prompt, ``[{"role": "assistant",
"content": text}]``); every extra column of the prompt rows arrives as a keyword argument with
one value per sample (``answer=["12", ...]``), those the function's signature names (all of
them when it takes ``**kwargs``). A function may be ``async`` (or return an awaitable): all of
them are awaited together.

    score[i] = sum(weight[f] * r_f[i] for f in fns if r_f[i] is not None)

``None`` means "no opinion": that function is left out of the sample's sum (a sample no
function scores gets 0, with a warning). NaN / Inf, a wrong count or a raised exception is a
``RewardFunctionError`` naming the function.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
import warnings
from collections.abc import Callable, Sequence

import torch


class RewardFunctionError(ValueError):
    """``reward_fn`` raised or returned something other than B finite numbers (or None); the
    message names the function and, from the trainer, the step."""


def function_name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(fn, "__qualname__", None) or type(fn).__name__


def accepted_columns(fn, columns: dict) -> dict:
    """The columns ``fn``'s signature takes (every one with ``**kwargs``)."""
    if not columns:
        return {}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(columns)
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in columns.items() if k in names}


def run_awaitables(awaitables: list) -> list:
    """Results of ``awaitables``, awaited together (in a fresh thread when a loop already runs here)."""
    async def gather():
        return await asyncio.gather(*awaitables)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", asyncio.run(gather())))
    t.start()
    t.join()
    return out["r"]


def to_values(name: str, raw, n: int) -> torch.Tensor:
    """(n,) float64 with NaN for None, from a function's return value."""
    if isinstance(raw, (str, bytes, dict)) or raw is None or not hasattr(raw, "__len__"):
        raise RewardFunctionError(f"reward_fn {name} must return {n} numbers, got {type(raw).__name__} "
                                  "(a list of floats, None for no opinion)")
    if isinstance(raw, torch.Tensor):
        vals = raw.detach().double().cpu().reshape(-1) if raw.dim() <= 1 else raw.double()
        none = torch.zeros(vals.shape, dtype=torch.bool)
    else:
        raw = list(raw)
        none = torch.tensor([v is None for v in raw], dtype=torch.bool)
        try:
            vals = torch.tensor([0.0 if v is None else float(v) for v in raw], dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise RewardFunctionError(f"reward_fn {name} must return {n} numbers (or None): {e}") from None
    if vals.shape != (n,):
        raise RewardFunctionError(f"reward_fn {name} must return {n} scores, got shape {tuple(vals.shape)}")
    if not torch.isfinite(vals[~none]).all():
        raise RewardFunctionError(f"reward_fn {name} returned non-finite scores: {vals.tolist()}")
    return vals.masked_fill(none, float("nan"))


class RewardFunctions:
    """One or several reward functions with their weights (module docstring).

    Args:
        fns: a callable, or a list of them.
        weights: one float per function (default 1 each).
    """

    def __init__(self, fns, weights: Sequence[float] | None = None):
        self.listed = isinstance(fns, (list, tuple))
        fns = list(fns) if self.listed else [fns]
        if not fns:
            raise ValueError("reward_fn: an empty list of reward functions")
        for f in fns:
            if not callable(f):
                raise TypeError(f"reward_fn must be callable as f(prompts, completions, **columns), got {f!r}")
        if weights is not None and len(weights) != len(fns):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(fns)} reward functions")
        self.fns = fns
        self.weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
        names = [function_name(f) for f in fns]
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def __call__(self, prompts: list, completions: list, columns: dict | None = None, device=None):
        """(scores (B,) fp32 on ``device``, {name: (B,) fp32 with NaN where None})."""
        n = len(completions)
        columns = columns or {}
        raws, pending = [], {}
        for i, (name, f) in enumerate(zip(self.names, self.fns)):
            try:
                r = f(list(prompts), list(completions), **accepted_columns(f, columns))
            except Exception as e:  # noqa: BLE001 - the user's function: say whose error it is
                raise RewardFunctionError(f"reward_fn {name} raised {type(e).__name__}: {e}") from e
            if inspect.isawaitable(r):
                pending[i] = r
            raws.append(r)
        if pending:
            try:
                for i, r in zip(pending, run_awaitables(list(pending.values()))):
                    raws[i] = r
            except Exception as e:  # noqa: BLE001
                raise RewardFunctionError(f"an async reward_fn raised {type(e).__name__}: {e}") from e
        parts = {name: to_values(name, r, n) for name, r in zip(self.names, raws)}
        stacked = torch.stack(list(parts.values()))  # (F, B)
        w = torch.tensor(self.weights, dtype=torch.float64)[:, None]
        total = torch.where(stacked.isnan(), 0.0, stacked * w).sum(0)
        unscored = stacked.isnan().all(0)
        if unscored.any():
            warnings.warn(f"{int(unscored.sum())} of {n} samples got None from every reward function "
                          f"({', '.join(self.names)}); they score 0", stacklevel=2)
        return total.float().to(device), {k: v.float().to(device) for k, v in parts.items()}


def function_scores(reward_fn: Callable, prompts, completions, device) -> torch.Tensor:
    """(B,) fp32 from one ``reward_fn(prompts, completions)`` (B finite numbers or None)."""
    return RewardFunctions(reward_fn)(prompts, completions, None, device)[0]
