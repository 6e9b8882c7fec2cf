"""Supervised fine-tuning: next-token NLL on response tokens only.

    hidden = trunk(input_ids, attention_mask).last_hidden_state            # (B, T, H)
    sel = response_mask[:, 1:]                                             # positions whose NEXT token is a response token
    logits = lm_head(hidden[:, :-1][sel])                                  # (M, V): the LM head sees response positions only
    loss = -token_logprobs(logits, input_ids[:, 1:][sel]).mean()           # token mean over the batch

Prompt tokens (and the chat template's user turn) are context, never targets. With
``lm_head="fused"`` (the default) the loss is ``linear_cross_entropy(hidden[:, :-1][sel],
lm_head.weight, ...)``: the LM head and the NLL in one chunked pass with the gradients formed in
the forward, so no (M, V) tensor exists. "materialize" runs the LM head and the fused
``token_logprobs`` op (one streaming log-softmax pass; backward writes into the logits' storage).

    trainer = SFTTrainer(SFTConfig(output_dir="runs/sft"), model=causal_lm, tokenizer=tok,
                         train_data=[{"prompt": "2+2=", "response": "4"}, ...], eval_data=[...])
    trainer.train()          # -> {"eval/loss": ..., "eval/ppl": ...}; runs/sft/final is an HF checkpoint
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from rlhf_fast.data import SFT_FIELDS
from rlhf_fast.encoding import encode_conversation, encode_example, pad_batch
from rlhf_fast.ops import linear_cross_entropy, token_logprobs
from rlhf_fast.stops import stop_token_ids
from rlhf_fast.trainer.config import LM_HEAD_MODES, check_choice
from rlhf_fast.trainer.lm_head import causal_lm_head_operands, check_plain_lm_head, head_logits
from rlhf_fast.trainer.model import lm_trunk, trunk_forward
from rlhf_fast.trainer.supervised import SupervisedConfig, SupervisedTrainer


@dataclass
class SFTConfig(SupervisedConfig):
    """SFT fields: those of SupervisedConfig (``batch_size`` counts sequences)."""

    output_dir: str = "runs/sft"
    learning_rate: float = 1e-4
    assistant_only_loss: bool = True  # {"messages"} rows: loss on the assistant turns only (False: every token)
    # "fused": the NLL from hidden states (linear_cross_entropy; no (tokens, vocab) tensor) |
    # "materialize": the LM head's logits, then token_logprobs
    lm_head: str = "fused"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "lm_head", LM_HEAD_MODES)


def response_nll(model, batch: dict, *, with_aux: bool = False, lm_head: str = "fused"):
    """(mean NLL over the response tokens, their count) for a padded batch from ``pad_batch``;
    ``with_aux``: a third item, the router aux loss of a mixture-of-experts model; ``lm_head``
    as SFTConfig's."""
    if lm_head not in LM_HEAD_MODES:
        raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    hidden, aux = trunk_forward(lm_trunk(model), ids, attn, router_aux=with_aux)
    sel = resp[:, 1:]
    if lm_head == "fused":
        h = causal_lm_head_operands(model, hidden[:, :-1][sel])
        with torch.autocast(h.hidden.device.type, enabled=False):
            nll = linear_cross_entropy(h.hidden, h.weight, ids[:, 1:][sel], **h.op_kwargs())
        return (nll, sel.sum(), aux) if with_aux else (nll, sel.sum())
    logits = head_logits(model, hidden[:, :-1][sel])
    logp = token_logprobs(logits, ids[:, 1:][sel], inplace_backward=True)
    return (-logp.mean(), sel.sum(), aux) if with_aux else (-logp.mean(), sel.sum())


class SFTTrainer(SupervisedTrainer):
    """SFT of a Hugging Face causal LM on ``{"prompt", "response"}`` examples.

    Args:
        config: an SFTConfig.
        model: an ``AutoModelForCausalLM`` model whose logits are ``lm_head(hidden)``.
        tokenizer: its tokenizer (chat template used when it has one; see ``rlhf_fast.encoding``).
        train_data, eval_data: lists of ``{"prompt": str, "response": str}`` or ``{"messages": [...]}``
            (``load_sft(path)``).

    Responses end at their first stop token (``stops.py``), which is trained as the last target;
    a warning names how many training responses hold no stop token (the model would not learn
    to stop).
    """

    config_class = SFTConfig
    primary_metric = "loss"

    def __init__(self, config: SFTConfig, *, model, tokenizer, train_data, eval_data=None):
        lm_trunk(model)
        check_plain_lm_head(model)
        self.stop_ids = stop_token_ids(tokenizer, model, config.stop_tokens)
        super().__init__(config, model=model, tokenizer=tokenizer, train_data=train_data, eval_data=eval_data)
        stops = set(self.stop_ids)
        unstopped = sum(not stops.intersection(e.trained()) for e in self.train_set)
        if unstopped and self.rank == 0:
            names = [tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids]
            warnings.warn(f"{unstopped} of {len(self.train_set)} SFT training responses contain no stop token "
                          f"{names} (cut by max_length={config.max_length}, or a chat template that ends turns "
                          "with plain text): the model does not learn to stop on them", stacklevel=2)

    def encode(self, example):
        if not isinstance(example, dict):
            raise TypeError(f"an SFT example must be a dict with keys {list(SFT_FIELDS)}, got {type(example).__name__}")
        cfg = self.config
        if "messages" in example:
            return encode_conversation(self.tokenizer, example["messages"], cfg.max_length, self.stop_ids,
                                       assistant_only=cfg.assistant_only_loss)
        for k in SFT_FIELDS:
            if not isinstance(example.get(k), str):
                raise ValueError(f"an SFT example needs a string {k!r} (or a list of 'messages')")
        return encode_example(self.tokenizer, example["prompt"], example["response"], cfg.max_length, self.stop_ids)

    def weight(self, item) -> float:
        if item.loss_mask is not None:
            return sum(item.loss_mask[1:])
        return len(item.ids) - max(item.n_prompt, 1)  # response tokens that have a preceding token

    def model_loss(self, model, items):
        batch = {k: v.to(self.device) for k, v in pad_batch(items, self.pad_id).items()}
        lm_head = self.config.lm_head
        if self.aux_coef > 0:
            loss, _, aux = response_nll(model, batch, with_aux=True, lm_head=lm_head)
            return loss + self.aux_coef * aux, {"nll": loss.detach(), "router_aux": aux.detach()}
        loss, _ = response_nll(model, batch, lm_head=lm_head)
        return loss, {}

    @torch.no_grad()
    def evaluate(self, data=None) -> dict:
        out = super().evaluate(data)
        out["ppl"] = math.exp(min(out["loss"], 50.0))
        return out
