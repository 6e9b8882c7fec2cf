"""JSONL datasets for the three RLHF stages, and their tokenization.

    sft          {"prompt": str, "response": str}             -> load_sft(path)
    preferences  {"prompt": str, "chosen": str, "rejected": str} -> load_preferences(path)
    prompts      {"prompt": str}                               -> load_prompts(path)

One JSON object per line; other keys are allowed and ignored. A malformed line (bad JSON, a
missing or non-string field, a blank line) raises ``DataError`` naming the file and the line;
nothing is skipped; an empty file is an error too.

Tokenization: when the tokenizer has a chat template, the prompt becomes a user turn and the
response the assistant turn (``format_prompt``, ``encode_pair``); otherwise the prompt text is
encoded as is (with the tokenizer's own special tokens, e.g. BOS) and the response is followed by EOS.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)


class DataError(ValueError):
    """A dataset file that cannot be used as it is; the message names the file and line."""


def load_jsonl(path, fields) -> list[dict]:
    """Reads ``path`` (one JSON object a line) and returns, per line, ``{field: str}`` for ``fields``.

    Every field must be present and a string; ``prompt`` may be empty, the others may not.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                raise DataError(f"{where}: blank line (every line must be one JSON object with keys {list(fields)})")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with keys {list(fields)}, got {type(obj).__name__}")
            row = {}
            for k in fields:
                if k not in obj:
                    raise DataError(f"{where}: missing key {k!r} (expected keys {list(fields)}, got {sorted(obj)})")
                v = obj[k]
                if not isinstance(v, str):
                    raise DataError(f"{where}: {k!r} must be a string, got {type(v).__name__}")
                if k != "prompt" and not v:
                    raise DataError(f"{where}: {k!r} is empty")
                row[k] = v
            if "chosen" in row and row["chosen"] == row.get("rejected"):
                raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty dataset (expected JSON lines with keys {list(fields)})")
    return rows


def load_sft(path) -> list[dict]:
    """``{"prompt", "response"}`` lines -> list of dicts."""
    return load_jsonl(path, SFT_FIELDS)


def load_preferences(path) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` lines -> list of dicts."""
    return load_jsonl(path, PREFERENCE_FIELDS)


def load_prompts(path) -> list[str]:
    """``{"prompt"}`` lines -> list of prompt strings."""
    return [r["prompt"] for r in load_jsonl(path, PROMPT_FIELDS)]


def write_jsonl(path, rows) -> None:
    """Writes dicts one per line (the inverse of ``load_jsonl``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------- tokenization
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the policy continues: the chat template's user turn plus the generation prompt,
    or ``prompt`` itself when the tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def policy_prompt(tokenizer, prompt: str) -> str:
    """The prompt text to hand a PPO/GRPO trainer, which encodes prompts with
    ``tokenizer(text)`` (special tokens added): chosen so that those ids equal
    ``encode_prompt(tokenizer, prompt)``, the ids SFT trained on. (A chat template that writes
    the BOS itself would otherwise get a second one from the tokenizer.)"""
    text = format_prompt(tokenizer, prompt)
    bos = getattr(tokenizer, "bos_token", None)
    if has_chat_template(tokenizer) and bos and text.startswith(bos):
        added = tokenizer("")["input_ids"]
        if added[:1] == [tokenizer.bos_token_id]:
            text = text[len(bos):]
    return text


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``format_prompt(tokenizer, prompt)`` (special tokens added once)."""
    if has_chat_template(tokenizer):  # the template writes its own BOS, if any
        return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) for a prompt and its response; the response ids end the turn
    (the chat template's end-of-turn tokens, or EOS)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    if has_chat_template(tokenizer):
        p_text = format_prompt(tokenizer, prompt)
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(p_text):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as its prompt followed by the "
                "assistant turn; cannot separate response tokens (use a tokenizer without a chat template)"
            )
        return prompt_ids, tokenizer(full[len(p_text):], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token: responses cannot be terminated")
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class Encoded:
    """One tokenized prompt + response: ``ids`` (T,) and ``n_prompt`` leading prompt tokens."""

    ids: list[int]
    n_prompt: int


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> Encoded:
    """Tokenizes one example, cutting the response (never the prompt) to fit ``max_length``."""
    p, r = encode_pair(tokenizer, prompt, response)
    if len(p) >= max_length:
        raise DataError(f"prompt is {len(p)} tokens, which leaves no room for a response within max_length={max_length}")
    return Encoded(p + r[: max_length - len(p)], len(p))


def encode_preference(tokenizer, example, max_length: int) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) of one ``{"prompt", "chosen", "rejected"}`` row, each as ``encode_example``;
    errors name the missing or non-string key."""
    if not isinstance(example, dict):
        raise TypeError(f"a preference example must be a dict with keys {list(PREFERENCE_FIELDS)}, "
                        f"got {type(example).__name__}")
    for k in PREFERENCE_FIELDS:
        if not isinstance(example.get(k), str):
            raise ValueError(f"a preference example needs a string {k!r}")
    return (encode_example(tokenizer, example["prompt"], example["chosen"], max_length),
            encode_example(tokenizer, example["prompt"], example["rejected"], max_length))


def pad_batch(examples: list[Encoded], pad_id: int) -> dict:
    """Right-pads encoded examples.

    Returns ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64, ``response_mask`` (B, T)
    bool (True on response tokens, the ones the SFT loss predicts) and ``last`` (B,) int64, the
    index of each row's last real token (where a reward model reads its score).
    """
    T = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, e.n_prompt:n] = True
    last = attn.sum(1) - 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "last": last}
