"""Metrics: a tqdm bar, one JSON line per step, TensorBoard when installed, a PNG of the curves.

Usage (any trainer)::

    from rlhf_fast.trainer.metrics import MetricsLogger
    with MetricsLogger(output_dir, total_steps=100, start_step=0) as log:
        for step in range(100):
            ...
            log.log(step + 1, {"reward/mean": 0.3, "loss/policy": 0.1})
    # output_dir/metrics.jsonl, output_dir/metrics.png, output_dir/tensorboard/ (if installed)

Values may be Python numbers or 0-d tensors (converted with ``float``; do that conversion once
per step, never per micro-batch, to keep host syncs out of the hot path). When resuming at
``start_step=k``, records with ``step > k`` already in ``metrics.jsonl`` (and a line cut short
by a killed run) are dropped, so the file reads like one uninterrupted run; the file is
replaced atomically (temp file + fsync + rename), so a kill during the rewrite loses nothing.

Distributed hook: reduce metrics across ranks *before* calling ``log`` and construct the
logger with ``enabled=is_main_process()`` (the default), so only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

from rlhf_fast.trainer.fileio import write_atomic, write_error, writing

JSONL = "metrics.jsonl"
PNG = "metrics.png"


def is_main_process() -> bool:
    """Rank 0 of an initialised torch.distributed group, or True when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def read_jsonl(path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path, last_step: int) -> None:
    """Drops the records of ``path`` with ``step > last_step`` and lines that do not parse (a
    record cut short by a kill), keeping the others byte for byte. Atomic: the file is rewritten
    beside itself and renamed over the old one, and only when something is dropped."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run killed mid-rewrite
        stale.unlink(missing_ok=True)
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    kept, dropped_bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            dropped_bad += 1
            continue
        if step <= last_step:
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if dropped_bad:
        warnings.warn(f"{path}: dropped {dropped_bad} unreadable line(s) (a record cut short by a killed run)")
    new = b"".join(kept)
    if new != raw:
        with writing(path, "metrics", "the file is unchanged"):
            write_atomic(path, new)


def _to_float(name, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().double().item())
    return float(value)


class MetricsLogger:
    """Logs one dict of scalar metrics per step to tqdm, JSONL, TensorBoard and (at close) a PNG.

    Args:
        output_dir: where metrics.jsonl, metrics.png and tensorboard/ go.
        total_steps: length of the progress bar.
        start_step: the step a resumed run starts from (earlier JSONL records are kept).
        progress: show a tqdm bar; its postfix shows ``progress_keys``.
        tensorboard: write TensorBoard events when ``torch.utils.tensorboard`` imports.
        plot: write metrics.png with one panel per metric at ``close()``.
        enabled: False on non-zero ranks: every method is then a no-op.
    """

    def __init__(self, output_dir, total_steps: int, *, start_step: int = 0, progress: bool = True,
                 tensorboard: bool = True, plot: bool = True, enabled: bool | None = None,
                 progress_keys=("reward/mean", "kl/ref", "loss/policy"), desc: str = "train"):
        self.enabled = is_main_process() if enabled is None else enabled
        self.output_dir = Path(output_dir)
        self.plot = plot
        self.progress_keys = tuple(progress_keys)
        self._bar = self._tb = self._file = None
        if not self.enabled:
            return
        path = self.output_dir / JSONL
        with writing(path, "metrics"):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # resume: keep what the earlier run logged up to start_step
                truncate_jsonl(path, start_step)
            self._file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard not installed
                self._tb = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> dict:
        """Records ``metrics`` (name -> scalar) for ``step``; returns them as floats."""
        values = {k: _to_float(k, v) for k, v in metrics.items()}
        if not self.enabled:
            return values
        record = {"step": step, **values}
        self._write(step, json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{values[k]:.4g}" for k in self.progress_keys if k in values}, refresh=False)
            self._bar.refresh()
        return values

    def _write(self, step: int, line: str) -> None:
        """Appends one record; when that fails (a full disk) the file is cut back to its earlier
        records and closed (nothing more is written for this run), and a WriteError names it."""
        f, path = self._file, self.output_dir / JSONL
        size = os.fstat(f.fileno()).st_size
        try:
            f.write(line)
            f.flush()
        except OSError as e:
            self._file, self.plot = None, False
            with contextlib.suppress(OSError):
                f.close()  # flushes again and fails again; the descriptor is released all the same
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise write_error(e, path, f"the metrics of step {step} to",
                              f"the records before step {step} are intact") from e

    def close(self) -> None:
        """Flushes everything and writes metrics.png."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.plot:
                plot_metrics(self.output_dir / JSONL, self.output_dir / PNG)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# metrics.png: panels grouped by meaning (a metric joins the first group whose test matches), shown in PLOT_ORDER
PLOT_GROUPS = (
    ("reward", lambda k: any(w in k for w in ("reward", "gold", "accuracy"))),
    ("KL", lambda k: "kl" in k.split("/")[-1] or k.startswith("kl/")),
    ("loss", lambda k: "loss" in k or k.endswith("ppl")),
    ("throughput", lambda k: k.startswith(("time/", "perf/")) or k in ("lr", "epoch")),
    ("policy health", lambda k: True),
)
PLOT_ORDER = ("reward", "KL", "loss", "policy health", "throughput")


def metric_group(key: str) -> str:
    """The panel group of a metric name (PLOT_GROUPS)."""
    return next(name for name, test in PLOT_GROUPS if test(key))


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average with a window of about a tenth of the series (bias-corrected)."""
    alpha = 2.0 / (max(len(values) // 10, 1) + 1)
    out, avg, w = [], 0.0, 0.0
    for v in values:
        avg, w = (1 - alpha) * avg + alpha * v, (1 - alpha) * w + alpha
        out.append(avg / w)
    return out


def plot_metrics(jsonl_path, png_path, keys=None) -> Path | None:
    """One panel per metric (all keys but ``step`` unless ``keys`` is given), grouped by meaning
    (reward first, then KL, loss, policy health, throughput; one row or more per group), step on
    the x axis, the raw points faint under a smoothed line; a series of one point is a marker.
    Written atomically; returns the PNG's path, or None when there is nothing to plot."""
    records = read_jsonl(jsonl_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if keys is None:
        keys = sorted({k for r in records for k in r if k != "step"})
    if not keys:
        return None
    order = PLOT_ORDER
    first = ("reward/mean", "train/loss", "eval/loss")  # the headline series lead their group
    keys = sorted(keys, key=lambda k: (k not in first, k))
    groups = {g: [k for k in keys if metric_group(k) == g] for g in order}
    cols = min(4, max(len(v) for v in groups.values()))
    layout = []  # rows of (group, keys)
    for g in order:
        ks = groups[g]
        layout += [(g, ks[i : i + cols]) for i in range(0, len(ks), cols)]
    fig, axes = plt.subplots(len(layout), cols, figsize=(4 * cols, 2.7 * len(layout)), squeeze=False)
    for row, (g, ks) in zip(axes, layout):
        for ax, k in zip(row, ks):
            pts = [(r["step"], r[k]) for r in records if k in r and r[k] is not None and math.isfinite(r[k])]
            if len(pts) == 1:
                ax.plot(*zip(*pts), marker="o", ms=6, ls="none", color="tab:blue")
            elif pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=".", ms=3, ls="none", alpha=0.35, color="tab:blue")
                ax.plot(xs, smooth(list(ys)), lw=1.5, color="tab:blue")
            ax.set_title(f"[{g}] {k}", fontsize=9)
            ax.set_xlabel("step", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in row[len(ks):]:
            ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.stem}.tmp-{os.getpid()}.png")
    try:
        with writing(png_path, "the metrics plot", f"{jsonl_path} is intact"):
            fig.savefig(tmp, dpi=90)
            os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png_path
