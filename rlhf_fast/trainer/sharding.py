"""Models under a process group: the trained model sharded with PyTorch's FSDP2
(``fully_shard`` per transformer block and at the root) or wrapped in DDP, frozen models sharded
or replicated, gathering a sharded model's parameters for direct calls (``generate``), and its
full state dicts on rank 0 (for checkpoints). Outside a process group models just move to the
device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from rlhf_fast.trainer.process_group import is_distributed, rank, world_size

STRATEGIES = ("fsdp", "ddp")
FROZEN_SHARDING = ("shard", "replicate")
_MESH = {"mesh": None, "group": None}


def device_mesh(device: torch.device):
    if _MESH["mesh"] is None or _MESH["group"] is not dist.group.WORLD:  # one mesh per process group
        from torch.distributed.device_mesh import init_device_mesh

        _MESH["mesh"], _MESH["group"] = init_device_mesh(device.type, (world_size(),)), dist.group.WORLD
    return _MESH["mesh"]


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (the classes Hugging Face models list in
    ``_no_split_modules``, e.g. ``LlamaDecoderLayer``): the units FSDP all-gathers one at a time."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def sync_module_states(module: nn.Module, device: torch.device) -> None:
    """Copies rank 0's parameters and buffers to every rank (one broadcast per tensor, staged
    through ``device`` under NCCL), so every rank shards or replicates the same model."""
    if world_size() == 1:
        return
    stage = dist.get_backend() == "nccl"
    seen = set()
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            buf = t.data.to(device) if stage and t.device != device else t.data
            dist.broadcast(buf, src=0)
            if buf is not t.data:
                t.data.copy_(buf)


def shard_blocks(model: nn.Module, device: torch.device) -> nn.Module:
    import warnings

    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh(device)
    for block in block_modules(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The root must initialise FSDP's state before any block runs a forward of its own (as
    # ``generate`` does): the first unit to run forward would otherwise take the root's role.
    model._get_fsdp_state()._lazy_init()
    # Our outputs are never modified in place; FSDP warns about views (values.squeeze) anyway.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model


class CallThrough(nn.Module):
    """``fn(module, *args, **kwargs)`` as a module's ``forward``. DDP and FSDP act at the
    forward of the module they wrap, so a loss computed from a model's parts (trunk + LM head
    on selected positions, as SFT does) must be called through one::

        net, fwd = prepare_trainable(CallThrough(lm, nll), "fsdp", device)
        (fwd(batch) * world_size() * n_local / all_reduce(n_local)).backward()
        export_pretrained(net.module, path)          # checkpoints / export: the inner model
    """

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)


def prepare_trainable(model: nn.Module, strategy: str, device: torch.device, *, find_unused_parameters: bool = False):
    """(model, forward_module) for training on every rank. Outside a process group: the model
    moved to ``device``, twice. ``"fsdp"``: ``fully_shard`` on each block and the root, in place
    (parameters become DTensor shards on ``device``), forward_module is the model itself;
    ``"ddp"``: the model on ``device`` and its ``DistributedDataParallel`` wrapper, which the
    loss's forward must go through. Every rank starts from rank 0's weights (DDP broadcasts them
    itself)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not is_distributed():
        model = model.to(device)
        return model, model
    if strategy == "fsdp":
        sync_module_states(model, device)
        model = shard_blocks(model, device)
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = model.to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
              find_unused_parameters=find_unused_parameters)  # buffers (rotary tables) never change
    return model, ddp


def prepare_frozen(model: nn.Module, sharding: str, device: torch.device) -> nn.Module:
    """A frozen model (reference, reward model) on every rank: ``"shard"`` (``fully_shard``
    per block and root; call it inside ``gathered(model, full=False)`` unless through its
    root ``forward``) or ``"replicate"`` (a full copy per rank)."""
    if sharding not in FROZEN_SHARDING:
        raise ValueError(f"sharding must be one of {FROZEN_SHARDING}, got {sharding!r}")
    if not is_distributed():
        return model.to(device)
    sync_module_states(model, device)
    if sharding == "replicate":
        return model.to(device)
    return shard_blocks(model, device)


@contextlib.contextmanager
def gathered(model: nn.Module | None, *, full: bool = True, within: nn.Module | None = None):
    """Lets code call an FSDP-sharded model's submodules directly (``policy.generate``,
    ``trunk`` + ``lm_head``) by all-gathering its root parameters (embeddings, LM head, ...)
    for the duration. ``full=True`` also all-gathers every block (of ``within``, default the
    whole model) once and keeps them through any number of forwards: no collective runs inside,
    so ranks may generate different numbers of tokens; memory: the full weights. With
    ``full=False`` blocks are gathered per forward as usual (every rank must then run the same
    number of forwards). A no-op for unsharded models and ``None``."""
    from torch.distributed.fsdp import FSDPModule

    if model is None or not isinstance(model, FSDPModule):
        yield model
        return
    blocks = [m for m in (within or model).modules() if isinstance(m, FSDPModule) and m is not model] if full else []
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m in [model, *blocks]]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield model
    finally:
        for m in [model, *blocks]:
            m.reshard()
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)


def no_sync(forward_module: nn.Module, skip: bool):
    """DDP's ``no_sync()`` when ``skip`` (gradient accumulation without an all-reduce on all but
    the last micro-batch); FSDP reduce-scatters every micro-batch (less memory)."""
    if skip and hasattr(forward_module, "no_sync"):
        return forward_module.no_sync()
    return contextlib.nullcontext()


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. ``clip_grad_norm_`` of FSDP gradients) as a plain tensor."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


# ---------------------------------------------------------------------------- full state dicts
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """FQN of each of the optimizer's parameters in its order (= its state_dict's indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            out.append(names[id(p)])
    return out


def _optim_by_index(osd: dict, names: list[str]) -> dict:
    """A ``get_optimizer_state_dict`` result (keyed by FQN) as ``optimizer.state_dict()`` keys it."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def _optim_by_name(osd: dict, names: list[str]) -> dict:
    return {"state": {names[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def full_state_dicts(model: nn.Module, optimizer=None):
    """(model state dict, optimizer state dict as ``optimizer.state_dict()`` keys it), full and
    on the CPU, on rank 0 ({} / None elsewhere). Every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_options(cpu_offload=True))
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
        osd = _optim_by_index(osd, _param_names(model, optimizer)) if rank() == 0 else None
    return msd, osd


def load_full_state_dicts(model: nn.Module, optimizer, msd: dict | None, osd: dict | None) -> None:
    """Inverse of :func:`full_state_dicts`: rank 0 passes the full model state and the optimizer
    state as ``optimizer.state_dict()`` keys it (None elsewhere); every rank keeps its shard.
    Every rank must call it (it broadcasts from rank 0)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, msd or {}, options=_options(broadcast_from_rank0=True))
    if optimizer is not None:
        if osd is not None:
            osd = _optim_by_name(osd, _param_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, osd or {}, options=_options(broadcast_from_rank0=True))
