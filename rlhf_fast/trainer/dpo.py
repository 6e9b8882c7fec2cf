"""DPO: skip the reward model and RL; classify the preference pairs directly (Rafailov et al. 2023).

    logp(y | x) = token_logprobs(lm_head(trunk(x + y)), y).sum()              # response tokens only
    ref_logp    = the same with the frozen reference, computed ONCE before training and cached
    loss, rewards/chosen, rewards/rejected = dpo_loss(logp_c, logp_r, ref_c, ref_r, beta=...)

Chosen and rejected responses of a micro-batch go through one concatenated forward (one padded
batch of 2B rows). ``loss_type``: "sigmoid" (DPO; ``label_smoothing`` > 0 gives conservative
DPO), "sigmoid_norm" (each side's log-ratio divided by its response length, TRL's name) or
"ipo" (IPO on length-normalised log-ratios, as TRL computes it). Metrics: ``rewards/chosen``,
``rewards/rejected`` (beta * log-ratio, means), ``rewards/margin``, ``rewards/accuracy`` (share
of pairs with chosen reward > rejected) and ``logps/accuracy`` (share where the policy itself
gives the chosen response the higher log-prob), for training and evaluation.

The loop, micro-batching, distribution (FSDP / DDP), checkpoints, resume and the export are the
supervised runtime's (``supervised.py``): a step is one optimizer step on ``batch_size`` pairs.
The reference log-probs are computed by every rank for the whole data set (a full copy of the
reference per rank, then freed) and written to ``output_dir/ref_logps.pt`` with a fingerprint of
the tokenised data, so a resumed run reads them back instead of recomputing (a fresh run
always recomputes them).

LoRA: the trainer optimises ``[p for p in model.parameters() if p.requires_grad]``, so a model
with adapters (the ``lora_*`` fields, once they land) trains its adapters only; pass the base
model (adapters off) as ``ref_model``, or leave it None to copy the model as it is at the start.

    trainer = DPOTrainer(DPOConfig(output_dir="runs/dpo", beta=0.1), model=sft_lm, tokenizer=tok,
                         train_data=[{"prompt", "chosen", "rejected"}, ...], eval_data=[...])
    trainer.train()     # -> {"eval/rewards/accuracy": ..., "eval/loss": ...}; runs/dpo/final: an HF checkpoint
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.encoding import Encoded, encode_preference, pad_batch
from rlhf_fast.ops import dpo_loss, linear_token_logprobs, token_logprobs
from rlhf_fast.stops import stop_token_ids
from rlhf_fast.trainer.config import LM_HEAD_MODES, check_choice, check_field
from rlhf_fast.trainer.lm_head import causal_lm_head_operands, check_plain_lm_head, head_logits
from rlhf_fast.trainer.model import lm_trunk, trunk_hidden
from rlhf_fast.trainer.process_group import barrier
from rlhf_fast.trainer.runtime import disable_dropout
from rlhf_fast.trainer.sharding import prepare_frozen
from rlhf_fast.trainer.supervised import SupervisedConfig, SupervisedTrainer

DPO_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "ipo")
REF_CACHE = "ref_logps.pt"


@dataclass
class DPOConfig(SupervisedConfig):
    """DPO fields (and those of SupervisedConfig; ``batch_size`` counts preference pairs)."""

    output_dir: str = "runs/dpo"
    learning_rate: float = 1e-6
    beta: float = 0.1  # strength of the implicit KL to the reference (IPO: its tau)
    loss_type: str = "sigmoid"  # "sigmoid" | "sigmoid_norm" (length-normalised) | "ipo" (length-normalised, as TRL)
    label_smoothing: float = 0.0  # sigmoid only: the assumed share of flipped labels (conservative DPO)
    # "fused": sequence log-probs from hidden states (linear_token_logprobs; no (tokens, vocab) tensor) |
    # "materialize": the LM head's logits, then token_logprobs
    lm_head: str = "fused"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "lm_head", LM_HEAD_MODES)
        check_field(self, "beta", self.beta > 0, "must be > 0")
        check_choice(self, "loss_type", DPO_LOSS_TYPES)
        check_field(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "must lie in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            check_field(self, "label_smoothing", False, f"applies to loss_type='sigmoid' only, not {self.loss_type!r}")


@dataclass
class Pair:
    """One encoded preference pair and its cached reference log-probs (summed over the response)."""

    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = float("nan")
    ref_rejected: float = float("nan")


def sequence_logps(model, items: list[Encoded], pad_id: int, device, lm_head: str = "fused"):
    """(summed response log-probs (N,) fp32, response token counts (N,)) of encoded examples
    under a causal LM, in one padded forward; the LM head (and its logit transform) sees
    response positions only, fused into ``linear_token_logprobs`` with ``lm_head="fused"``::

        logp[i] = log_softmax(head(hidden[i, t - 1]))[ids[i, t]] summed over response tokens t >= 1
    """
    batch = pad_batch(items, pad_id)
    ids, attn, resp = (batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
    hidden = trunk_hidden(lm_trunk(model), ids, attn)
    sel = resp[:, 1:]
    if lm_head == "fused":
        h = causal_lm_head_operands(model, hidden[:, :-1][sel])
        with torch.autocast(h.hidden.device.type, enabled=False):
            lp = linear_token_logprobs(h.hidden, h.weight, ids[:, 1:][sel], **h.op_kwargs())
    else:
        lp = token_logprobs(head_logits(model, hidden[:, :-1][sel]), ids[:, 1:][sel], inplace_backward=True).float()
    rows = torch.arange(len(items), device=device)[:, None].expand_as(sel)[sel]
    return torch.zeros(len(items), device=device).index_add(0, rows, lp), sel.sum(1)


def fingerprint(pairs: list[Pair]) -> str:
    h = hashlib.sha1()
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(repr((e.n_prompt, e.ids)).encode())
    return h.hexdigest()


class DPOTrainer(SupervisedTrainer):
    """DPO of a Hugging Face causal LM on ``{"prompt", "chosen", "rejected"}`` pairs.

    Args:
        config: a DPOConfig.
        model: an ``AutoModelForCausalLM`` model whose logits are ``lm_head(hidden)`` (usually the SFT one).
        tokenizer: its tokenizer (chat template used when it has one; see ``rlhf_fast.encoding``).
        train_data, eval_data: lists of ``{"prompt", "chosen", "rejected"}`` (``load_preferences``).
        ref_model: the frozen reference (default: a copy of ``model`` as passed).
    """

    config_class = DPOConfig
    primary_metric = "rewards/accuracy"

    def __init__(self, config: DPOConfig, *, model, tokenizer, train_data, eval_data=None, ref_model=None):
        lm_trunk(model)
        check_plain_lm_head(model)
        ref = ref_model if ref_model is not None else copy.deepcopy(model)
        lm_trunk(ref)
        self.stop_ids = stop_token_ids(tokenizer, model, config.stop_tokens)
        super().__init__(config, model=model, tokenizer=tokenizer, train_data=train_data, eval_data=eval_data)
        self.precompute_reference(ref)

    # ------------------------------------------------------------------ the reference, once
    @torch.no_grad()
    def precompute_reference(self, ref) -> None:
        """Fills every pair's ``ref_chosen`` / ``ref_rejected`` with ``ref``'s log-probs and writes
        them to the cache file (rank 0); a resumed run reads the file back when it was written for
        the same tokenised data (a fresh run always recomputes: its reference may differ)."""
        sets = {"train": self.train_set, "eval": self.eval_set or []}
        prints = {k: fingerprint(v) for k, v in sets.items()}
        path = Path(self.output_dir) / REF_CACHE
        cached = torch.load(path, map_location="cpu") if self.config.resume_from and path.is_file() else None
        if cached is not None and cached.get("fingerprints") == prints:
            values = cached["logps"]
        else:
            disable_dropout(ref)
            ref = prepare_frozen(ref.eval().requires_grad_(False), "replicate", self.device)
            values = {}
            for name, pairs in sets.items():
                out = []
                n = self.config.eval_batch_size
                for s in range(0, len(pairs), n):
                    part = pairs[s : s + n]
                    with self.autocast():
                        lp, _ = sequence_logps(ref, [p.chosen for p in part] + [p.rejected for p in part],
                                               self.pad_id, self.device, self.config.lm_head)
                    out.append(lp.view(2, -1).t().double().cpu())
                values[name] = torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.float64)
            del ref
            if self.rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"fingerprints": prints, "logps": values}, path)
            barrier()
        for name, pairs in sets.items():
            for p, (c, r) in zip(pairs, values[name].tolist()):
                p.ref_chosen, p.ref_rejected = c, r

    # ------------------------------------------------------------------ hooks
    def encode(self, example):
        pair = Pair(*encode_preference(self.tokenizer, example, self.config.max_length, self.stop_ids))
        for side, e in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            if len(e.ids) - max(e.n_prompt, 1) < 1:
                raise ValueError(f"the {side} response has no token to score (empty prompt without BOS, or cut "
                                 f"away by max_length={self.config.max_length})")
        return pair

    def model_loss(self, model, items):
        cfg, n = self.config, len(items)
        logps, lengths = sequence_logps(model, [p.chosen for p in items] + [p.rejected for p in items],
                                        self.pad_id, self.device, self.config.lm_head)
        pc, pr = logps.split(n)
        ref = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in items], dtype=torch.float32, device=self.device)
        norm = {}
        if cfg.loss_type != "sigmoid":
            lc, lr = lengths.split(n)
            norm = dict(chosen_lengths=lc, rejected_lengths=lr)
        loss, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=cfg.beta,
                                loss_type="ipo" if cfg.loss_type == "ipo" else "sigmoid",
                                label_smoothing=cfg.label_smoothing, **norm)
        pc, pr = pc.detach(), pr.detach()
        return loss, {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margin": (rc - rr).mean(),
                      "rewards/accuracy": (rc > rr).float().mean(), "logps/chosen": pc.mean(),
                      "logps/rejected": pr.mean(), "logps/accuracy": (pc > pr).float().mean()}
