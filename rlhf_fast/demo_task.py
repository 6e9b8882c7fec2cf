"""The demo's synthetic task: sort the digits of the prompt. Its gold reward is a program, so
every stage can be measured against the truth that the reward model only approximates.

    prompt      "5281:"                 3 to 6 distinct random digits, then ':'
    ideal       "1258" + EOS            the same digits in ascending order
    gold        f1 * order in [0, 1]    f1: multiset F1 of the completion's characters against
                                        the prompt's digits; order: fraction of adjacent pairs
                                        of the completion that do not descend

Stand-ins for the human parts of RLHF:
  demonstrations  the ideal answer with probability ``p_clean``, else the ideal answer after one
                  or two random edits (swap, drop, duplicate, insert, replace a digit, shuffle):
                  a labeller who knows the task but is careless. SFT learns this mixture.
  preferences     two answers to a prompt (a demonstration and an edited copy of it), the one with
                  the higher gold reward marked chosen, then flipped with probability
                  ``label_noise``: annotators who are mostly right.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

DIGITS = "0123456789"
SEP = ":"


def ideal(prompt: str) -> str:
    """The best completion of ``prompt``: its digits in ascending order."""
    return "".join(sorted(c for c in prompt if c in DIGITS))


def gold_reward(prompt: str, completion: str) -> float:
    """f1 * order (see the module docstring); 1.0 exactly for ``ideal(prompt)``, 0.0 for ''."""
    target, c = ideal(prompt), completion
    if not c or not target:
        return 0.0
    overlap = sum((Counter(c) & Counter(target)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(c), overlap / len(target)
    f1 = 2 * precision * recall / (precision + recall)
    order = 1.0 if len(c) < 2 else sum(a <= b for a, b in zip(c, c[1:])) / (len(c) - 1)
    return f1 * order


def gold_rewards(prompts, completions) -> list[float]:
    """``gold_reward`` over a batch: the ``reward_fn(prompts, completions)`` signature the trainers take."""
    return [gold_reward(p, c) for p, c in zip(prompts, completions)]


EDITS = ("swap", "drop", "duplicate", "insert", "replace", "shuffle")


def edit(rng: random.Random, s: str) -> str:
    """One random edit of a digit string (never returns an empty string)."""
    s = list(s)
    kind = rng.choice(EDITS)
    if kind == "swap" and len(s) >= 2:
        i = rng.randrange(len(s) - 1)
        s[i], s[i + 1] = s[i + 1], s[i]
    elif kind == "drop" and len(s) >= 2:
        del s[rng.randrange(len(s))]
    elif kind == "duplicate":
        i = rng.randrange(len(s))
        s.insert(i, s[i])
    elif kind == "insert":
        s.insert(rng.randrange(len(s) + 1), rng.choice(DIGITS))
    elif kind == "replace":
        s[rng.randrange(len(s))] = rng.choice(DIGITS)
    else:
        rng.shuffle(s)
    return "".join(s)


@dataclass
class SortTask:
    """Generator of the demo's prompts, demonstrations and preference pairs (all seeded)."""

    min_digits: int = 3
    max_digits: int = 6
    p_clean: float = 0.3  # share of demonstrations that are exactly right
    label_noise: float = 0.1  # share of preference labels flipped

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= len(DIGITS):
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 10, got {self.min_digits}, {self.max_digits}")
        if not 0 <= self.p_clean <= 1:
            raise ValueError(f"p_clean must lie in [0, 1], got {self.p_clean}")
        if not 0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must lie in [0, 0.5), got {self.label_noise}")

    def prompt(self, rng: random.Random) -> str:
        n = rng.randint(self.min_digits, self.max_digits)
        return "".join(rng.sample(DIGITS, n)) + SEP

    def demonstration(self, rng: random.Random, prompt: str) -> str:
        s = ideal(prompt)
        if rng.random() < self.p_clean:
            return s
        for _ in range(rng.choice((1, 2))):
            s = edit(rng, s)
        return s

    def preference(self, rng: random.Random, prompt: str, noisy: bool = True) -> dict:
        """A demonstration and an edited copy, ordered by gold reward (ties redrawn), the order
        flipped with probability ``label_noise`` when ``noisy``."""
        while True:
            a = self.demonstration(rng, prompt)
            b = edit(rng, a)
            ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
            if ga != gb:
                break
        if ga < gb:
            a, b = b, a
        if noisy and rng.random() < self.label_noise:
            a, b = b, a
        return {"prompt": prompt, "chosen": a, "rejected": b}

    # ------------------------------------------------------------------ datasets
    def prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(seed)
        return [self.prompt(rng) for _ in range(n)]

    def sft_data(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(seed)
        return [{"prompt": p, "response": self.demonstration(rng, p)} for p in (self.prompt(rng) for _ in range(n))]

    def preference_data(self, n: int, seed: int, noisy: bool = True) -> list[dict]:
        rng = random.Random(seed)
        return [self.preference(rng, self.prompt(rng), noisy) for _ in range(n)]
