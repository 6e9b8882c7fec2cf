"""Reward model: a transformer trunk with a scalar head, trained on pairwise preferences.

    r = head(trunk(prompt + response).last_hidden_state[last attended token])      # (B,)
    loss, accuracy = reward_model_loss(r_chosen, r_rejected)                       # Bradley-Terry:
    # loss = -logsigmoid(r_chosen - r_rejected).mean(); accuracy = (r_chosen > r_rejected).mean()

The model is a Hugging Face ``*ForSequenceClassification`` with ``num_labels=1`` (its ``score``
head read at each row's last attended token, exactly as the PPO/GRPO rollouts read it), or
anything with ``score_sequences(input_ids, attention_mask)`` such as a PolicyValueModel.
``reward_model_from_pretrained(path)`` builds one from any causal-LM folder (e.g. the SFT
checkpoint): same trunk, fresh scalar head.

    rm = reward_model_from_pretrained("runs/sft/final")
    trainer = RewardTrainer(RewardConfig(output_dir="runs/rm"), model=rm, tokenizer=tok,
                            train_data=[{"prompt": ..., "chosen": ..., "rejected": ...}], eval_data=[...])
    trainer.train()          # -> {"eval/accuracy": ..., "eval/loss": ...}; runs/rm/final is an HF checkpoint
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_fast.encoding import encode_preference, pad_batch
from rlhf_fast.ops import reward_model_loss
from rlhf_fast.stops import stop_token_ids
from rlhf_fast.trainer.hf_io import distinct_pad
from rlhf_fast.trainer.rollout import sequence_scores
from rlhf_fast.trainer.supervised import SupervisedConfig, SupervisedTrainer


@dataclass
class RewardConfig(SupervisedConfig):
    """Reward-model fields: those of SupervisedConfig (``batch_size`` counts preference pairs)."""

    output_dir: str = "runs/rm"
    learning_rate: float = 5e-5
    margin: float = 0.0  # Bradley-Terry margin: loss = -logsigmoid(r_chosen - r_rejected - margin)


def reward_model_from_pretrained(path, *, pad_token_id=None, **kwargs):
    """``AutoModelForSequenceClassification`` with one label from a local folder: a trained reward
    model, or a causal LM (e.g. an SFT checkpoint) whose trunk gets a fresh scalar head. A causal
    LM whose family has no ``*ForSequenceClassification`` class (OLMoE, Granite, Cohere, ...), or
    a folder written by a PolicyValueModel, becomes a ``PolicyValueModel`` scorer instead (its
    value head read at the last attended token; ``score_sequences``). ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``attn_implementation``, ``trust_remote_code``, ...)."""
    from pathlib import Path

    import transformers

    from rlhf_fast.trainer.model import META_FILE, PolicyValueModel

    kwargs.setdefault("num_labels", 1)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: score.weight" is the point here
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        has_seqcls = type(config) in transformers.AutoModelForSequenceClassification._model_mapping
        if (Path(path) / META_FILE).is_file() or not has_seqcls:
            fresh = not (Path(path) / META_FILE).is_file()
            kwargs.pop("num_labels")
            model = PolicyValueModel.from_pretrained(path, value_head=True, separate_critic=False, **kwargs)
            if fresh:  # a scalar head drawn as HF draws a fresh ``score`` head
                std = getattr(config.get_text_config(), "initializer_range", 0.02)
                torch.nn.init.normal_(model.value_head.weight, std=std)
            model.config = model.policy.config
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


class RewardTrainer(SupervisedTrainer):
    """Bradley-Terry reward-model training on ``{"prompt", "chosen", "rejected"}`` pairs.

    Args:
        config: a RewardConfig.
        model: a sequence-classification model with one label (``reward_model_from_pretrained``),
            or anything with ``score_sequences(input_ids, attention_mask)``.
        tokenizer: the tokenizer (its chat template is used when it has one).
        train_data, eval_data: lists of ``{"prompt", "chosen", "rejected"}`` (``load_preferences``:
            strings, or conversational messages).

    Each response ends at its stop token (``stops.py``), the token the score is read at, in
    training and in rollouts alike. A tokenizer whose pad token is a stop token (or missing) is
    copied with a distinct pad added (``hf_io.distinct_pad``), so the exported model scores as
    rlhf_fast does under ``AutoModelForSequenceClassification``.

    Reported: ``accuracy`` (fraction of pairs with r_chosen > r_rejected), ``loss``, ``margin``
    (mean r_chosen - r_rejected), ``reward_mean``.
    """

    config_class = RewardConfig
    primary_metric = "accuracy"
    lora_task_type = "SEQ_CLS"

    def __init__(self, config: RewardConfig, *, model, tokenizer, train_data, eval_data=None):
        self.stop_ids = stop_token_ids(tokenizer, None, config.stop_tokens)
        if hasattr(model, "score"):  # a HF sequence classifier: its pad must not be the token it reads
            tokenizer = distinct_pad(model, tokenizer, self.stop_ids)
        super().__init__(config, model=model, tokenizer=tokenizer, train_data=train_data, eval_data=eval_data)
        cfg = getattr(self.model, "config", None)
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = self.pad_id  # so the exported model also runs through HF's own forward

    def encode(self, example):
        return encode_preference(self.tokenizer, example, self.config.max_length, self.stop_ids)

    def model_loss(self, model, items):
        batch = pad_batch([c for c, _ in items] + [r for _, r in items], self.pad_id)
        ids, attn = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        scores, aux = sequence_scores(model, ids, attn, with_aux=True) if self.aux_coef > 0 else (
            sequence_scores(model, ids, attn), None)
        chosen, rejected = scores.split(len(items))
        margin = self.config.margin or None
        loss, acc = reward_model_loss(chosen, rejected, margin=margin)
        stats = {"accuracy": acc, "margin": (chosen - rejected).mean().detach(), "reward_mean": scores.mean().detach()}
        if aux is not None:
            stats["router_aux"] = aux.detach()
            loss = loss + self.aux_coef * aux
        return loss, stats
