"""How an RL step's sequences are cut for the update: stratified mini-batches (one optimizer
step each) and the micro-batches of one mini-batch, with the loss scales that make them sum
to the mini-batch loss.

Mini-batches are stratified: a pass over a step's ``n`` sequences cuts them into
``mini_batch_size`` consecutive slots of ``k = n / mini_batch_size`` sequences and draws, per
slot, a random permutation saying which mini-batch gets which of its sequences. Every
mini-batch takes one sequence of each slot, and a rank holding whole slots holds its share of
every mini-batch without any data moving.

The micro-batch scales come from the gathered mini-batch mask (``collectives.py``; the
identity on one process), so the update does not depend on the world size. ``loss_agg`` means
what ``ops.aggregation_weights`` says, here as in the policy losses.
"""
from __future__ import annotations

import torch

from rlhf_fast.ops import aggregation_weights
from rlhf_fast.trainer.collectives import gather_rows, global_max
from rlhf_fast.trainer.process_group import rank, world_size
from rlhf_fast.trainer.rollout import Rollout


def mini_batch_indices(n: int, mini_batch_size: int, generator: torch.Generator, rank: int = 0,
                       world: int = 1) -> list[torch.Tensor]:
    """Rows of rank ``rank``'s ``n`` sequences (global rows ``rank*n .. (rank+1)*n - 1`` of
    ``world*n``) in each of the ``k = world*n / mini_batch_size`` stratified mini-batches:

        order = torch.rand(mini_batch_size, k, generator=generator).argsort(-1)  # a permutation per slot
        mini_batch[j] = [s * k + order[s, j] for s in range(mini_batch_size)]     # one row of each slot

    (the global rows; each rank keeps those of its ``mini_batch_size / world`` slots, shifted
    to its own rows). The same draw on every rank, so the union over ranks is the
    single-process mini-batch."""
    total = n * world
    if total % mini_batch_size or mini_batch_size % world:
        raise ValueError(f"mini_batch_size={mini_batch_size} must divide the {total} sequences and be divisible by "
                         f"the world size {world}")
    k, per_rank = total // mini_batch_size, mini_batch_size // world
    order = torch.rand(mini_batch_size, k, generator=generator).argsort(-1)
    local = torch.arange(per_rank)[:, None] * k + order[rank * per_rank : (rank + 1) * per_rank]
    return list(local.t().unbind())


def micro_batches(batch: Rollout, mini: torch.Tensor, config):
    """Yields (micro_batch, scale) for mini-batch ``mini`` (rows of ``batch``) cut into
    ``config.micro_batch_size`` rows, with ``sum(scale * loss(micro_batch)) == loss(mini-batch)``
    for ``config.loss_agg``: a token's weight in the global mini-batch loss
    (``aggregation_weights`` of the gathered mini-batch mask) over its weight in its
    micro-batch's loss, times the world size (DDP / FSDP average the ranks' gradients)."""
    agg, n_tok = config.loss_agg, config.max_new_tokens
    mask = batch.response_mask[mini]
    width = global_max(mask.shape[1])
    w_mini = aggregation_weights(gather_rows(mask, width), agg, max_tokens=n_tok, dtype=torch.float64)
    n = mask.shape[0]
    w_mini = w_mini[rank() * n : (rank() + 1) * n, : mask.shape[1]]
    for part, w in zip(mini.split(config.micro_batch_size), w_mini.split(config.micro_batch_size)):
        w_micro = aggregation_weights(batch.response_mask[part], agg, max_tokens=n_tok, dtype=torch.float64)
        ratio = torch.where(w_micro > 0, w / w_micro.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        yield batch.select(part), (ratio.amax() * world_size()).float()
