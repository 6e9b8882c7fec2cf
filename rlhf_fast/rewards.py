"""Ready-made reward functions for RL with verifiable rewards (RLVR).

Every function follows TRL's convention, which the PPO / GRPO trainers use too::

    f(prompts, completions, **columns) -> list[float | None]

``prompts`` and ``completions`` are lists of strings (or, for conversational data, lists of
``{"role", "content"}`` messages); every extra column of the prompt rows arrives as a keyword
argument holding one value per sample (e.g. ``answer=["12", "7", ...]``). ``None`` means "no
opinion" for that sample: the trainer leaves it out of that function's weighted sum.

    reward_fn: rlhf_fast.rewards:math_answer                  # in a PPO / GRPO config
    reward_fn: [rlhf_fast.rewards:math_answer, rlhf_fast.rewards:boxed_format]
    reward_weights: [1.0, 0.1]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

__all__ = ["completion_text", "extract_answer", "answers_match", "math_answer", "boxed_format"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def completion_text(completion) -> str:
    """The text of a completion: a string as is, or the content of a conversation's last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: the last ``\\boxed{...}``, else the last number, else None."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(s: str) -> Fraction | None:
    s = s.strip().replace(",", "").replace(" ", "").rstrip(".")
    s = s.removeprefix("$").removesuffix("$")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str | None, answer) -> bool:
    """Numeric equality when both sides parse as numbers (``"1,000" == "1000.0"``, ``"1/2" == "0.5"``),
    else equality of the whitespace-normalised strings."""
    if predicted is None or answer is None:
        return False
    answer = str(answer)
    a, b = _as_number(predicted), _as_number(answer)
    if a is not None and b is not None:
        return a == b
    return " ".join(predicted.split()) == " ".join(answer.split())


def math_answer(prompts, completions, answer=None, **columns) -> list[float | None]:
    """1.0 when the completion's final answer (see ``extract_answer``) equals the row's ``answer``
    column, else 0.0; None for rows whose answer is missing (None)."""
    if answer is None:
        raise ValueError("math_answer needs an 'answer' column in the prompt rows")
    if len(answer) != len(completions):
        raise ValueError(f"math_answer: {len(completions)} completions but {len(answer)} answers")
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if gold is None:
            out.append(None)
            continue
        out.append(1.0 if answers_match(extract_answer(completion_text(completion)), gold) else 0.0)
    return out


def boxed_format(prompts, completions, **columns) -> list[float]:
    """Format reward: 1.0 when the completion states exactly one ``\\boxed{...}`` answer and ends with
    it (nothing but whitespace or a full stop after the closing brace), else 0.0."""
    out = []
    for completion in completions:
        text = completion_text(completion)
        ok = text.count("\\boxed{") == 1 and _last_boxed(text) is not None
        if ok:
            tail = text[text.rfind("\\boxed{") :]
            end = len("\\boxed{") + len(_last_boxed(text)) + 1
            ok = tail[end:].strip() in ("", ".", "$", "$.", "\\]", "\\].")
        out.append(1.0 if ok else 0.0)
    return out
