"""RLAIF: a local causal LM as the judge, no human labels.

Scalar mode (a reward for PPO / GRPO / RLOO / best-of-N, no generation)::

    text  = template.format(prompt=p, completion=c)                   # the rubric prompt
    score = sum_t token_logprobs(lm_head(trunk(text + verdict))[t - 1], verdict[t])   # log p(verdict | text)
    score = log p(verdict | text) - log p(contrast | text)             # when ``contrast`` is given ("Yes" vs "No")

Pairwise mode (preference pairs for the reward-model or DPO stage: ``rlhf-fast label-pairs``)::

    m(a, b) = log p(" A" | pair_template(p, a, b)) - log p(" B" | pair_template(p, a, b))
    margin  = (m(a, b) - m(b, a)) / 2        # both orders: the judge's position bias cancels
    chosen, rejected = (a, b) if margin > 0 else (b, a)

Texts are encoded with ``tokenizer(text)`` (its special tokens, e.g. BOS, added), the verdict
with ``add_special_tokens=False``; a batch is left-padded so every verdict sits in the last
columns and the LM head runs on those positions only (fused ``token_logprobs``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf_fast.ops import token_logprobs
from rlhf_fast.trainer.model import response_logits
from rlhf_fast.trainer.rollout import left_pad

SCALAR_TEMPLATE = "Question: {prompt}\nAnswer: {completion}\nIs the answer correct? Answer Yes or No:"
PAIR_TEMPLATE = "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is better, A or B? Answer:"


@dataclass
class JudgeConfig:
    """Fields of ``rlhf-fast label-pairs`` (the judge's rubric and batching)."""

    output_dir: str = "runs/label_pairs"  # writes output_dir/preferences.jsonl
    device: str = "auto"
    seed: int = 0
    overwrite_output_dir: bool = False
    batch_size: int = 32  # texts per forward
    max_length: int = 1024  # longer texts keep their end
    pair_template: str = PAIR_TEMPLATE  # with {prompt}, {a}, {b}
    verdict_a: str = " A"
    verdict_b: str = " B"

    def __post_init__(self):
        from rlhf_fast.trainer.config import check_field, check_types

        check_types(self)
        check_field(self, "device", self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                    "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        check_field(self, "batch_size", self.batch_size >= 1, "must be >= 1")
        check_field(self, "max_length", self.max_length >= 2, "must be >= 2")
        for name in ("verdict_a", "verdict_b"):
            check_field(self, name, bool(getattr(self, name)), "must be a non-empty string")
        check_field(self, "verdict_b", self.verdict_a != self.verdict_b, "must differ from verdict_a")


class Judge:
    """A frozen causal LM that scores texts by the log-probability of a verdict.

    Args:
        model: an ``AutoModelForCausalLM`` (its logits ``lm_head(hidden)``).
        tokenizer: its tokenizer.
        template: the scalar rubric, with ``{prompt}`` and ``{completion}``.
        verdict, contrast: the verdict text scored (e.g. " Yes") and an optional contrast (" No").
        pair_template, pair_verdicts: the pairwise rubric (``{prompt}``, ``{a}``, ``{b}``) and its two verdicts.
        batch_size: texts per forward. max_length: longer texts keep their end (the verdict side).
    """

    def __init__(self, model, tokenizer, *, template: str = SCALAR_TEMPLATE, verdict: str = " Yes",
                 contrast: str | None = " No", pair_template: str = PAIR_TEMPLATE,
                 pair_verdicts: tuple[str, str] = (" A", " B"), batch_size: int = 32, max_length: int = 1024,
                 device=None):
        for name, tpl, keys in (("template", template, ("prompt", "completion")),
                                ("pair_template", pair_template, ("prompt", "a", "b"))):
            if not isinstance(tpl, str):
                raise TypeError(f"{name} must be a str, got {type(tpl).__name__}")
            try:
                tpl.format(**{k: "" for k in keys})
            except (KeyError, IndexError, ValueError) as e:
                fields = ", ".join("{" + k + "}" for k in keys)
                raise ValueError(f"{name} may use only the fields {fields}: {e}") from None
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.template, self.pair_template = template, pair_template
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size, self.max_length = batch_size, max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # padding is masked out
        self.verdict = self._verdict_ids("verdict", verdict)
        self.contrast = self._verdict_ids("contrast", contrast) if contrast is not None else None
        if len(pair_verdicts) != 2:
            raise ValueError(f"pair_verdicts must be two strings, got {pair_verdicts!r}")
        self.pair_verdicts = tuple(self._verdict_ids("pair_verdicts", v) for v in pair_verdicts)
        self.__qualname__ = f"Judge({type(model).__name__})"  # how reward errors name it

    def _verdict_ids(self, name: str, text) -> list[int]:
        if not isinstance(text, str) or not text:
            raise ValueError(f"{name} must be a non-empty string, got {text!r}")
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"{name}={text!r} encodes to no tokens")
        return ids

    # ------------------------------------------------------------------ the score
    @torch.no_grad()
    def verdict_logprobs(self, texts: Sequence[str], verdict: list[int]) -> torch.Tensor:
        """(N,) fp32: ``log p(verdict | text)`` for each text (module docstring)."""
        out = []
        keep = self.max_length - len(verdict)
        for s in range(0, len(texts), self.batch_size):
            seqs = [list(self.tokenizer(t)["input_ids"])[-keep:] + verdict for t in texts[s : s + self.batch_size]]
            ids, mask = left_pad(seqs, self.pad_id, self.device)
            start = ids.shape[1] - len(verdict)
            logits = response_logits(self.model, ids, mask, start)
            targets = torch.tensor(verdict, device=self.device).expand(len(seqs), -1)
            out.append(token_logprobs(logits, targets).float().sum(-1))
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """(B,) scalar-mode scores: ``log p(verdict) [- log p(contrast)]`` under the rubric."""
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions differ in length: {len(prompts)} vs {len(completions)}")
        texts = [self.template.format(prompt=p, completion=c) for p, c in zip(prompts, completions)]
        s = self.verdict_logprobs(texts, self.verdict)
        if self.contrast is not None:
            s = s - self.verdict_logprobs(texts, self.contrast)
        return s

    def __call__(self, prompts, completions) -> list[float]:
        """The ``reward_fn(prompts, completions)`` signature of the trainers."""
        return self.scores(prompts, completions).tolist()

    # ------------------------------------------------------------------ pairwise
    def pair_margins(self, prompts, a, b) -> torch.Tensor:
        """(B,) ``(m(a, b) - m(b, a)) / 2``: > 0 when the judge prefers ``a`` (module docstring)."""
        va, vb = self.pair_verdicts

        def m(x, y):
            texts = [self.pair_template.format(prompt=p, a=u, b=v) for p, u, v in zip(prompts, x, y)]
            return self.verdict_logprobs(texts, va) - self.verdict_logprobs(texts, vb)

        return (m(a, b) - m(b, a)) / 2


def label_pairs(judge: Judge, rows: list[dict]) -> list[dict]:
    """``{"prompt", "response_a", "response_b"}`` rows -> ``{"prompt", "chosen", "rejected",
    "judge_margin"}`` preference rows, labelled by ``judge.pair_margins`` (ties keep a first)."""
    for i, r in enumerate(rows):
        for k in ("prompt", "response_a", "response_b"):
            if not isinstance(r.get(k), str):
                raise ValueError(f"rows[{i}] needs a string {k!r}")
        if r["response_a"] == r["response_b"]:
            raise ValueError(f"rows[{i}]: response_a and response_b are identical (nothing to judge)")
    margins = judge.pair_margins([r["prompt"] for r in rows], [r["response_a"] for r in rows],
                                 [r["response_b"] for r in rows]).tolist()
    out = []
    for r, mg in zip(rows, margins):
        a, b = (r["response_a"], r["response_b"]) if mg >= 0 else (r["response_b"], r["response_a"])
        out.append({"prompt": r["prompt"], "chosen": a, "rejected": b, "judge_margin": abs(mg)})
    return out
