"""Running the trainers under torchrun, on PyTorch's own FSDP2 (``fully_shard``) or DDP.

    torchrun --nproc_per_node 8 -m rlhf_fast ppo --config cfg.yaml                 # one node
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m rlhf_fast ppo --config cfg.yaml

A trainer built in a process that torchrun launched (``WORLD_SIZE > 1``) joins the job by
itself (``init_distributed``: NCCL on CUDA, one GPU per rank, else gloo). Nothing here talks
to other processes except through ``torch.distributed`` collectives.

What each rank does, and what is global (``world`` ranks, global batch of ``B`` sequences):

    prompts     rank r samples prompts[r*B/world : (r+1)*B/world] (GRPO: the whole group)
    advantages  computed on the gathered global batch (gather_rows), each rank keeps its rows
    loss        scale = world * rows(micro) / all_reduce_sum(rows(mini))   # DDP/FSDP average gradients
    metrics     sums, counts, maxima all-reduced before rank 0 logs them

so ``world`` ranks on a global batch compute the update one process computes on it.

Models: the trainable one is sharded per transformer block and at its root with
``fully_shard`` (``strategy="fsdp"``) or wrapped in ``DistributedDataParallel``
(``"ddp"``); the frozen reference / reward models are sharded the same way or replicated.
Code that calls a sharded model other than through its root ``forward`` (``generate``, a
reference's trunk + LM head) runs inside ``gathered(model)``.

Checkpoints gather full state dicts to rank 0 (``get_model_state_dict(full_state_dict=True,
cpu_offload=True)``) and write the files of a single-process run, so any world size resumes
them (``load_checkpoint`` broadcasts them from rank 0 and each rank keeps its shard).

This module is the one import for all of it; the code lives in one module per idea:
``process_group`` (joining and leaving the job, rank, device), ``collectives`` (all-reduce,
broadcast, gathered rows, global moments), ``sharding`` (FSDP2 / DDP wrapping, gathering a
sharded model, full state dicts) and ``checkpoint`` (rank-aware save / load / export).

Any trainer (SFT, reward model, ...) can use the same pieces::

    init_distributed(cfg.device)                       # no-op outside torchrun
    device = rank_device(cfg.device)
    net, fwd = prepare_trainable(CallThrough(model, loss_fn), "fsdp", device)
    (fwd(batch) * world_size() * local_weight / all_reduce(local_weight)).backward()
    save_checkpoint(...) / load_checkpoint(...) / export_pretrained(net.module, ...)   # every rank
"""
from rlhf_fast.trainer.checkpoint import export_pretrained, load_checkpoint, save_checkpoint
from rlhf_fast.trainer.collectives import all_reduce, broadcast_object, gather_rows, global_max, global_moments
from rlhf_fast.trainer.process_group import (
    DEFAULT_TIMEOUT_S,
    barrier,
    distributed_run,
    init_distributed,
    is_distributed,
    local_rank,
    rank,
    rank_device,
    report_failure,
    shutdown,
    world_size,
)
from rlhf_fast.trainer.sharding import (
    FROZEN_SHARDING,
    STRATEGIES,
    CallThrough,
    block_modules,
    full_state_dicts,
    gathered,
    load_full_state_dicts,
    local_tensor,
    no_sync,
    prepare_frozen,
    prepare_trainable,
    sync_module_states,
)

__all__ = ["DEFAULT_TIMEOUT_S", "FROZEN_SHARDING", "STRATEGIES", "CallThrough", "all_reduce", "barrier",
           "block_modules", "broadcast_object", "distributed_run", "export_pretrained", "full_state_dicts",
           "gather_rows", "gathered", "global_max", "global_moments", "init_distributed", "is_distributed", "load_checkpoint",
           "load_full_state_dicts", "local_rank", "local_tensor", "no_sync", "prepare_frozen", "prepare_trainable",
           "rank", "rank_device", "report_failure", "save_checkpoint", "shutdown", "sync_module_states", "world_size"]
