"""Tokenization of the datasets (the rows of ``rlhf_fast.data``) for the trainers.

With a chat template the prompt becomes a user turn (or its own messages) and
the response the assistant turn; without one, the prompt text is encoded as is (with the
tokenizer's special tokens, e.g. BOS) and the response is followed by EOS (conversational data
then is an error). A response ends at its first stop token (``rlhf_fast.stops``: EOS,
the generation config's EOS ids, the template's end-of-turn token), and the template text after
it is left out; in a conversation that text is context for the next turn. SFT trains on the
assistant turns only (``assistant_only=False``: on every token).

``prompt_rows`` turns an RL trainer's prompts (strings, or rows with columns) into the texts the
policy continues; ``pad_batch`` right-pads encoded examples into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_fast.data import PREFERENCE_FIELDS, DataError
from rlhf_fast.stops import has_chat_template, stop_token_ids, turn_end


def prompt_rows(tokenizer, prompts) -> tuple[list[str], list, dict[str, list]]:
    """(prompt texts the policy continues, raw prompts reward functions see, {column: values})
    from strings (used as they are) or ``{"prompt", **columns}`` rows (formatted by ``policy_prompt``;
    the RL trainers take either)."""
    if isinstance(prompts, (str, dict)) or not hasattr(prompts, "__len__"):
        raise ValueError("prompts must be a non-empty list of strings or of {'prompt': ...} rows")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, dict) for p in prompts):
        return prompts, prompts, {}  # encode_prompts checks the strings
    names = []
    for i, row in enumerate(prompts):
        if "prompt" not in row:
            raise ValueError(f"prompts[{i}] has no 'prompt' key (got {sorted(row)})")
        names += [k for k in row if k != "prompt" and k not in names]
    raw = [row["prompt"] for row in prompts]
    columns = {k: [row.get(k) for row in prompts] for k in names}
    return [policy_prompt(tokenizer, p) for p in raw], raw, columns


def is_conversation(x) -> bool:
    return isinstance(x, list)


def as_messages(prompt) -> list[dict]:
    return prompt if is_conversation(prompt) else [{"role": "user", "content": prompt}]


def need_template(tokenizer, what="conversational data"):
    if not has_chat_template(tokenizer):
        raise DataError(f"{what} needs a tokenizer with a chat template (this tokenizer has none; set "
                        "tokenizer.chat_template or use {\"prompt\", \"response\"} strings)")


def render(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def format_prompt(tokenizer, prompt) -> str:
    """The text the policy continues: the chat template's rendering of the prompt (a user turn
    for a string) plus the generation prompt, or ``prompt`` itself without a chat template."""
    if not has_chat_template(tokenizer):
        if is_conversation(prompt):
            need_template(tokenizer, "a conversational prompt")
        return prompt
    return render(tokenizer, as_messages(prompt), generation_prompt=True)


def policy_prompt(tokenizer, prompt) -> str:
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


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of ``format_prompt(tokenizer, prompt)`` (special tokens added once)."""
    if has_chat_template(tokenizer):  # the template writes its own BOS, if any
        return _ids(tokenizer, format_prompt(tokenizer, prompt))
    return tokenizer(format_prompt(tokenizer, prompt))["input_ids"]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def conversation_segments(tokenizer, messages, stops) -> list[tuple[list[int], bool]]:
    """``(ids, is_assistant)`` pieces whose concatenation is the conversation: each assistant
    turn's ids run through its first stop token; the template text after it (and every other
    turn) is context."""
    need_template(tokenizer)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1])
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError("the tokenizer's chat template does not render a conversation as its earlier turns "
                            "followed by the assistant turn; cannot separate the assistant's tokens")
        turn = _ids(tokenizer, full[len(prefix):])
        end = turn_end(turn, stops) or len(turn)
        segments += [(_ids(tokenizer, prefix[len(done):]), False), (turn[:end], True), (turn[end:], False)]
        done = full
    return [(ids, a) for ids, a in segments if ids]


def encode_pair(tokenizer, prompt, response, stops=None) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) for a prompt (a string or messages) and its response (a
    string, or the assistant messages that follow a conversational prompt); the response ids
    end at the stop token that ends the (last) assistant turn (the chat template's end-of-turn
    token, or EOS); template text after it is not part of the response."""
    stops = stop_token_ids(tokenizer) if stops is None else stops
    prompt_ids = encode_prompt(tokenizer, prompt)
    if has_chat_template(tokenizer):
        turns = response if is_conversation(response) else [{"role": "assistant", "content": response}]
        msgs = as_messages(prompt)
        segs = conversation_segments(tokenizer, msgs + list(turns), stops)
        ids = [t for s, _ in segs for t in s]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError("the tokenizer's chat template does not render a conversation as its prompt followed "
                            "by the assistant turn; cannot separate response tokens")
        last = max(i for i, (_, a) in enumerate(segs) if a)
        return prompt_ids, ids[len(prompt_ids): sum(len(s) for s, _ in segs[: last + 1])]
    if is_conversation(response):
        need_template(tokenizer)
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token: responses cannot be terminated")
    return prompt_ids, _ids(tokenizer, response) + [tokenizer.eos_token_id]


@dataclass
class Encoded:
    """One tokenized example: ``ids`` (T,) and ``n_prompt`` leading prompt tokens; ``loss_mask``
    (T,), when given, marks the trained tokens instead (a conversation's assistant turns)."""

    ids: list[int]
    n_prompt: int
    loss_mask: list[bool] | None = None

    def trained(self) -> list[int]:
        """The ids of the trained (response) tokens."""
        if self.loss_mask is None:
            return self.ids[self.n_prompt:]
        return [t for t, m in zip(self.ids, self.loss_mask) if m]


def encode_example(tokenizer, prompt, response, max_length: int, stops=None) -> Encoded:
    """Tokenizes one example, cutting the response (never the prompt) to fit ``max_length``."""
    p, r = encode_pair(tokenizer, prompt, response, stops)
    if len(p) >= max_length:
        raise DataError(f"prompt is {len(p)} tokens, which leaves no room for a response within max_length={max_length}")
    return Encoded(p + r[: max_length - len(p)], len(p))


def encode_preference(tokenizer, example, max_length: int, stops=None) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) of one ``{"prompt", "chosen", "rejected"}`` row (strings, or lists of
    messages for a conversational row), each as ``encode_example``; errors name the bad key."""
    if not isinstance(example, dict):
        raise TypeError(f"a preference example must be a dict with keys {list(PREFERENCE_FIELDS)}, "
                        f"got {type(example).__name__}")
    for k in PREFERENCE_FIELDS:
        if not isinstance(example.get(k), (str, list)):
            raise ValueError(f"a preference example needs {k!r} (a string or a list of messages)")
    p = example["prompt"]
    return (encode_example(tokenizer, p, example["chosen"], max_length, stops),
            encode_example(tokenizer, p, example["rejected"], max_length, stops))


def encode_conversation(tokenizer, messages, max_length: int, stops=None, assistant_only: bool = True) -> Encoded:
    """A ``{"messages"}`` SFT row: every turn as context, the assistant turns trained (all
    tokens with ``assistant_only=False``), cut to ``max_length``."""
    stops = stop_token_ids(tokenizer) if stops is None else stops
    segs = conversation_segments(tokenizer, messages, stops)
    ids = [t for s, _ in segs for t in s][:max_length]
    mask = [a or not assistant_only for s, a in segs for _ in s][:max_length]
    first = mask.index(True) if True in mask else len(mask)
    if first >= len(mask) or (first == 0 and sum(mask) == 1):
        raise DataError(f"no assistant token fits within max_length={max_length}")
    return Encoded(ids, first, mask)


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
        if e.loss_mask is None:
            resp[i, e.n_prompt:n] = True
        else:
            resp[i, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    last = attn.sum(1) - 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "last": last}
