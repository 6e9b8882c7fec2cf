"""Where a sequence ends: one definition, used by SFT encoding, generation, completion masks,
reward-model training and scoring, and the export.

    stops = stop_token_ids(tokenizer, model)          # sorted ids, e.g. [<|endoftext|>, <|im_end|>]
    stops = stop_token_ids(tokenizer, model, "<|im_end|>,<|eot|>")   # the ``stop_tokens`` setting

Stop tokens = the tokenizer's EOS + every id of ``model.generation_config.eos_token_id`` + the
chat template's end-of-turn token (``end_of_turn_token``: the single added token the template
writes right after an assistant message, e.g. ChatML's ``<|im_end|>`` or Gemma's
``<end_of_turn>``). ``stop_tokens`` (comma-separated token strings) replaces the detected
end-of-turn token; EOS always stops. A response ends at (and includes) its first stop token;
whatever a template writes after it (ChatML's ``\\n``) is never part of a response, so a reward
model trains and scores at that stop token, and generation stops there.
"""
from __future__ import annotations

from collections.abc import Iterable

SENTINEL = "\u2063rlhf-fast-end-probe\u2063"  # a reply no template changes and no real text holds


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_token(tokenizer) -> str | None:
    """The token the chat template writes right after an assistant message, when it is one
    added (special) token of the tokenizer; None without a template or when the template ends
    turns with plain text."""
    if not has_chat_template(tokenizer):
        return None
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(conv, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses this conversation has no detectable turn end
        return None
    at = text.rfind(SENTINEL)
    if at < 0:
        return None
    rest = text[at + len(SENTINEL):]
    added = [t for t in tokenizer.get_added_vocab() if t and rest.startswith(t)]
    return max(added, key=len) if added else None


def token_id(tokenizer, token: str, where: str = "stop_tokens") -> int:
    """The id of ``token`` as one token of the vocabulary; a ValueError naming ``where`` otherwise."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", None) and token != tokenizer.unk_token:
        raise ValueError(f"{where}: {token!r} is not a token of the tokenizer's vocabulary")
    return int(tid)


def parse_stop_tokens(spec) -> list[str]:
    """``"<|im_end|>,<|eot|>"`` (or a list of strings) -> the token strings."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, str):
        return [t.strip() for t in spec.split(",") if t.strip()]
    if isinstance(spec, Iterable) and all(isinstance(t, str) for t in spec):
        return list(spec)
    raise TypeError(f"stop_tokens must be a comma-separated string of tokens, got {spec!r}")


def generation_eos_ids(model) -> list[int]:
    """Ids of ``model.generation_config.eos_token_id`` (an int or a list; [] without one)."""
    gen = getattr(getattr(model, "policy", model), "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def stop_token_ids(tokenizer, model=None, stop_tokens=None) -> list[int]:
    """Sorted stop ids (module docstring). ``model``: a causal LM (or PolicyValueModel) whose
    generation_config adds its EOS ids; ``stop_tokens``: token strings replacing the template's
    detected end-of-turn token. A ValueError when nothing would stop a sequence."""
    ids = set(generation_eos_ids(model)) if model is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    override = parse_stop_tokens(stop_tokens)
    if override:
        ids.update(token_id(tokenizer, t) for t in override)
    else:
        eot = end_of_turn_token(tokenizer)
        if eot is not None:
            ids.add(token_id(tokenizer, eot, "the chat template's end-of-turn token"))
    if not ids:
        raise ValueError("no stop token: the tokenizer has no eos_token, the model's generation_config no "
                         "eos_token_id, and no stop_tokens were given")
    return sorted(ids)


def turn_end(ids: list[int], stops) -> int | None:
    """Index just past the first stop token of ``ids`` (None when there is none)."""
    stops = set(stops)
    for i, t in enumerate(ids):
        if t in stops:
            return i + 1
    return None


def tokenizer_mismatch(policy_tokenizer, reward_tokenizer) -> str | None:
    """Why a reward model's tokenizer would read the policy's ids differently (another
    vocabulary, chat template or stop tokens), or None. A pad token the reward model added
    (``hf_io.distinct_pad``) is no difference."""
    pv, rv = policy_tokenizer.get_vocab(), reward_tokenizer.get_vocab()
    extra = set(rv) - set(pv)
    rpad = reward_tokenizer.pad_token
    if set(pv) - set(rv) or extra - {rpad} or any(rv[t] != i for t, i in pv.items()):
        return f"vocabularies differ ({len(pv)} vs {len(rv)} tokens)"
    if (policy_tokenizer.chat_template or None) != (reward_tokenizer.chat_template or None):
        return "chat templates differ"
    a, b = stop_token_ids(policy_tokenizer), stop_token_ids(reward_tokenizer)
    if a != b:
        return f"stop tokens differ ({a} vs {b})"
    return None
