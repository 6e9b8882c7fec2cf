"""Rollouts: prompts -> left-padded ids -> sampled completions (HF ``generate``, KV cache) ->
scores (a ``reward_fn`` or a reward model) -> the per-token log-probs and values the update
treats as "old".

Every function here works on this rank's batch only; the trainers gather and reduce around
them (``base.py`` through ``collectives.py``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf_fast.ops import linear_token_logprobs, token_logprobs
from rlhf_fast.trainer.model import last_token_index, lm_trunk, response_hidden, response_logits, trunk_forward
from rlhf_fast.trainer.reward_fns import RewardFunctionError, RewardFunctions, function_scores  # noqa: F401


# ---------------------------------------------------------------------------- prompts
def special_ids(tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id). A tokenizer without a pad token pads with EOS (padding is masked out)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: completions need an end-of-sequence token")
    pad = tokenizer.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int, truncation: str = "left") -> list[list[int]]:
    """Token ids of each prompt, at most ``max_length`` of them: "left" drops the start of a
    longer prompt (keeps the text nearest the completion), "right" its end, "error" raises."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        ids = list(tokenizer(p)["input_ids"])
        if not ids:
            raise ValueError(f"prompts[{i}] encodes to no tokens; give it text or use a tokenizer that adds BOS")
        if len(ids) > max_length:
            if truncation == "error":
                raise ValueError(f"prompts[{i}] has {len(ids)} tokens > max_prompt_length={max_length}")
            ids = ids[-max_length:] if truncation == "left" else ids[:max_length]
        out.append(ids)
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, max len), rows right-aligned so every prompt ends at
    the same column and completions start together (whatever the tokenizer's padding_side)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, L - len(s):] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------- sampling
def _sampled_logprob_recorder(temperature: float):
    """A (LogitsProcessor, StoppingCriteria) pair for ``generate``: the processor applies the
    temperature itself (``scores / temperature``, as HF's warper, which is then left out) and keeps
    the result, i.e. the logits the sampler draws from; the criterion, called once the token is
    appended, records its log-prob with the fused ``token_logprobs`` (one (B, V) row per step
    alive at a time; it never stops generation)."""
    from transformers import LogitsProcessor, StoppingCriteria

    class Keep(LogitsProcessor):
        scores = None

        def __call__(self, input_ids, scores):
            Keep.scores = scores / temperature if temperature != 1.0 else scores
            return Keep.scores

    class Record(StoppingCriteria):
        steps: list = []

        def __call__(self, input_ids, scores, **kwargs):
            tok = input_ids[:, -1:]
            self.steps.append(token_logprobs(Keep.scores[:, None], tok)[:, 0].float())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    record = Record()
    record.steps = []
    return Keep(), record


@torch.no_grad()
def sample_completions(policy, input_ids, attention_mask, *, max_new_tokens: int, temperature: float,
                       eos_id, pad_id: int, with_logprobs: bool = False):
    """(B, R <= max_new_tokens) sampled completion ids, drawn from ``softmax(logits / temperature)``
    with the KV cache; a row stops at ``eos_id`` (an id, or every stop id: ``rlhf_fast.stops``). Nothing else shapes the distribution (no top-k / top-p / repetition
    penalty, whatever the model's generation_config says), so the loss can recompute it.
    With ``with_logprobs``: (ids, sampler_logprobs (B, R) fp32), the log-probs of the sampled tokens
    under the distribution they were drawn from (the sampler's numerics, no extra forward)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    gen = GenerationConfig(
        do_sample=True, temperature=1.0 if with_logprobs else temperature, top_k=0, top_p=1.0, min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=max_new_tokens, min_new_tokens=0,
        eos_token_id=eos_id if isinstance(eos_id, int) else list(eos_id), pad_token_id=pad_id, use_cache=True, bad_words_ids=None, suppress_tokens=None,
        begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
    )
    saved = policy.generation_config
    policy.generation_config = GenerationConfig()  # the model's own defaults must not leak in
    extra = {}
    if with_logprobs:
        keep, record = _sampled_logprob_recorder(temperature)
        extra = dict(logits_processor=LogitsProcessorList([keep]), stopping_criteria=StoppingCriteriaList([record]))
    try:
        # synced_gpus=False: under FSDP the trainer gathers the whole policy first (distributed.gathered),
        # so no rank waits for another's tokens
        seq = policy.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen,
                              synced_gpus=False, **extra)
    finally:
        policy.generation_config = saved
    responses = seq[:, input_ids.shape[1]:]
    if not with_logprobs:
        return responses
    R = responses.shape[1]
    lp = torch.stack(record.steps[:R], 1) if R else responses.new_zeros(responses.shape, dtype=torch.float32)
    return responses, lp


def completion_mask(responses: torch.Tensor, eos_id) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): mask (B, R) bool is True up to and including the first stop token
    (``eos_id``: an id or a list of stop ids; everything when there is none); has_eos (B,) bool."""
    stops = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=responses.device)
    is_eos = torch.isin(responses, stops)
    before = torch.cumsum(is_eos.long(), -1) - is_eos.long()  # EOS seen strictly before t
    return before == 0, is_eos.any(-1)


def decode_completions(tokenizer, responses, mask) -> list[str]:
    return [tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(responses.cpu(), mask.cpu())]


# ---------------------------------------------------------------------------- scoring
def sequence_scores(model, input_ids, attention_mask, *, with_aux: bool = False):
    """(B,) fp32 scores of whole sequences, differentiable: anything with
    ``score_sequences(input_ids, attention_mask)`` (e.g. a PolicyValueModel used as a trunk with a
    scalar head), or a HF ``*ForSequenceClassification`` with one label, read at each row's last
    attended token (found from the mask, so pad == eos and left padding are fine). ``with_aux``:
    (scores, router aux loss) of a mixture-of-experts model."""
    if hasattr(model, "score_sequences"):
        if with_aux:
            scores, aux = model.score_sequences(input_ids, attention_mask, with_aux=True)
            return scores.float().reshape(-1), aux
        return model.score_sequences(input_ids, attention_mask).float().reshape(-1)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"reward model ({type(model).__name__}) must define score_sequences() or be a "
                        "Hugging Face *ForSequenceClassification model with a `score` head")
    hidden, aux = trunk_forward(lm_trunk(model), input_ids, attention_mask, router_aux=with_aux)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    out = head(hidden[rows, last_token_index(attention_mask)])
    if out.shape[-1] != 1:
        raise ValueError(f"reward model must have one output (num_labels=1), got {out.shape[-1]}")
    return (out[:, 0].float(), aux) if with_aux else out[:, 0].float()


@torch.no_grad()
def reward_model_scores(reward_model, input_ids, attention_mask) -> torch.Tensor:
    """``sequence_scores`` without autograd: the rollout's reward-model scores."""
    return sequence_scores(reward_model, input_ids, attention_mask)


# ---------------------------------------------------------------------------- the batch
@dataclass
class Rollout:
    """One batch of sampled sequences and everything computed about them.

    input_ids / attention_mask: (B, P + R) left-padded prompt + completion (padding after EOS
    is masked); response_start: P; response_mask (B, R) bool; scores (B,); has_eos (B,).
    sampler_logprobs (B, R) fp32, 0 outside response_mask: the sampler's own log-probs (when recorded).
    Filled later, each (B, R) fp32 and 0 outside response_mask: logprobs (policy at sampling
    time), ref_logprobs, values, rewards, advantages (GRPO: (B,)), returns.
    """

    prompts: list
    completions: list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    scores: torch.Tensor
    has_eos: torch.Tensor
    logprobs: torch.Tensor | None = None
    sampler_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    reward_parts: dict | None = None  # {reward function name: (B,) fp32, NaN where it returned None}

    def __len__(self):
        return self.input_ids.shape[0]

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.response_start:]

    def select(self, idx: torch.Tensor, trim: bool = True) -> Rollout:
        """Rows ``idx``; with ``trim`` drop response columns that are padding in every chosen row
        (causal attention makes the kept positions' outputs identical)."""
        R = self.response_mask.shape[1]
        keep = R
        if trim:
            m = self.response_mask[idx]
            keep = max(int(m.any(0).nonzero().max()) + 1, 1) if m.any() else 1
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[idx]
                if v.dim() == 2:
                    v = v[:, : self.response_start + keep] if v.shape[1] == self.input_ids.shape[1] else v[:, :keep]
            elif isinstance(v, list):
                v = [v[i] for i in idx.tolist()]
            elif isinstance(v, dict):
                v = {k: t[idx] for k, t in v.items()}
            out[f.name] = v
        return Rollout(**out)


def sample_rollout(policy, tokenizer, prompts, prompt_ids, *, max_new_tokens, temperature, device,
                   reward_fn=None, reward_model=None, missing_eos_penalty=0.0, autocast=None, stop_ids=None,
                   raw_prompts=None, columns=None, record_logprobs: bool = False) -> Rollout:
    """Samples one completion per prompt, stopping at any of ``stop_ids`` (default: EOS), and
    scores it: ``reward_fn`` (a callable or ``RewardFunctions``) on ``raw_prompts`` (default
    ``prompts``), the completion texts and ``columns`` ({name: one value per prompt}), or
    ``reward_model`` on ids (read at the stop token). Completions that never emit a stop
    token lose ``missing_eos_penalty``. ``record_logprobs``: also keep the sampler's log-probs
    (``Rollout.sampler_logprobs``)."""
    eos_id, pad_id = special_ids(tokenizer)
    eos_id = eos_id if stop_ids is None else list(stop_ids)
    ids, mask = left_pad(prompt_ids, pad_id, device)
    ctx = autocast() if autocast is not None else torch.autocast(torch.device(device).type, enabled=False)
    was_training = policy.training
    policy.eval()
    try:
        with ctx:
            out = sample_completions(policy, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                     eos_id=eos_id, pad_id=pad_id, with_logprobs=record_logprobs)
    finally:
        policy.train(was_training)
    responses, sampler_lp = out if record_logprobs else (out, None)
    resp_mask, has_eos = completion_mask(responses, eos_id)
    input_ids = torch.cat([ids, torch.where(resp_mask, responses, pad_id)], 1)
    attention_mask = torch.cat([mask, resp_mask.long()], 1)
    completions = decode_completions(tokenizer, responses, resp_mask)
    parts = None
    if reward_fn is not None:
        fns = reward_fn if isinstance(reward_fn, RewardFunctions) else RewardFunctions(reward_fn)
        raw = list(prompts if raw_prompts is None else raw_prompts)
        shown = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(raw, completions)]
        scores, parts = fns(raw, shown, columns, device)
        parts = parts if fns.listed else None
    else:
        with ctx:
            scores = reward_model_scores(reward_model, input_ids, attention_mask)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_eos).float()
    if sampler_lp is not None:
        sampler_lp = torch.where(resp_mask, sampler_lp, 0.0)
    return Rollout(list(prompts), completions, input_ids, attention_mask, ids.shape[1], resp_mask, scores, has_eos,
                   sampler_logprobs=sampler_lp, reward_parts=parts)


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One Rollout of the rows of ``parts`` (sampled but not yet scored by the trainer: only the
    sampling fields), prompts re-left-padded and responses right-padded to the widest part."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.response_start for r in parts)
    R = max(r.response_mask.shape[1] for r in parts)

    def pad(x, left, right, value):
        return torch.nn.functional.pad(x, (left, right), value=value)

    ids, att, rmask, slp = [], [], [], []
    for r in parts:
        p, w = r.response_start, r.response_mask.shape[1]
        ids.append(torch.cat([pad(r.input_ids[:, :p], P - p, 0, pad_id), pad(r.input_ids[:, p:], 0, R - w, pad_id)], 1))
        att.append(torch.cat([pad(r.attention_mask[:, :p], P - p, 0, 0), pad(r.attention_mask[:, p:], 0, R - w, 0)], 1))
        rmask.append(pad(r.response_mask, 0, R - w, False))
        if r.sampler_logprobs is not None:
            slp.append(pad(r.sampler_logprobs, 0, R - w, 0.0))
    return Rollout([p for r in parts for p in r.prompts], [c for r in parts for c in r.completions], torch.cat(ids),
                   torch.cat(att), P, torch.cat(rmask), torch.cat([r.scores for r in parts]),
                   torch.cat([r.has_eos for r in parts]), sampler_logprobs=torch.cat(slp) if slp else None,
                   reward_parts={k: torch.cat([r.reward_parts[k] for r in parts]) for k in parts[0].reward_parts}
                   if parts[0].reward_parts else None)


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, *, temperature: float, micro_batch_size: int, with_values: bool = False,
                     autocast=None, lm_head: str = "fused"):
    """(logprobs, values-or-None), each (B, R) fp32 and 0 outside the response mask, from
    ``model``: a PolicyValueModel (values too when asked) or a plain causal LM (the reference).
    Runs ``micro_batch_size`` rows at a time; log-probs at ``temperature``, as sampled.
    ``lm_head="fused"``: from the hidden states (``linear_token_logprobs``, no (rows, R, V)
    logits); "materialize": the LM head's logits, then ``token_logprobs``."""
    if lm_head not in ("fused", "materialize"):
        raise ValueError(f"lm_head must be 'fused' or 'materialize', got {lm_head!r}")
    fused = lm_head == "fused"
    B, R = rollout.response_mask.shape
    logps = torch.zeros(B, R, dtype=torch.float32, device=rollout.input_ids.device)
    values = torch.zeros_like(logps) if with_values else None
    for s in range(0, B, micro_batch_size):
        mb = rollout.select(torch.arange(s, min(s + micro_batch_size, B), device=logps.device), trim=False)
        with autocast() if autocast is not None else torch.autocast(logps.device.type, enabled=False):
            if hasattr(model, "value_head"):
                out, v = model(mb.input_ids, mb.attention_mask, mb.response_start, with_values=with_values,
                               return_hidden=fused)
            else:
                head_fn = response_hidden if fused else response_logits
                out, v = head_fn(model, mb.input_ids, mb.attention_mask, mb.response_start), None
            if not fused:
                lp = token_logprobs(out, mb.responses, temperature=temperature)
        if fused:
            with torch.autocast(logps.device.type, enabled=False):
                lp = linear_token_logprobs(out.hidden, out.weight, mb.responses, temperature=temperature,
                                           **out.op_kwargs())
        logps[s : s + len(mb)] = torch.where(mb.response_mask, lp, 0.0)
        if with_values:
            values[s : s + len(mb)] = torch.where(mb.response_mask, v.float(), 0.0)
    return logps, values
