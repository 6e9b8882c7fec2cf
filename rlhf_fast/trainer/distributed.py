"""Running the trainers under torchrun, on PyTorch's own FSDP2 (``fully_shard``) or DDP.

    torchrun --nproc_per_node 8 -m rlhf_fast ppo --config cfg.yaml                 # one node
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m rlhf_fast ppo --config cfg.yaml

A trainer built in a process that torchrun launched (``WORLD_SIZE > 1``) joins the job by
itself (``init_distributed``: NCCL on CUDA, one GPU per rank, else gloo). Nothing here talks
to other processes except through ``torch.distributed`` collectives.

What each rank does, and what is global (``world`` ranks, global batch of ``B`` sequences):

    prompts     rank r samples prompts[r*B/world : (r+1)*B/world] (GRPO: the whole group)
    whitening   mean, var = global_moments(x, mask)          # two all-reduces of (count, sum), (sum sq. dev.)
    loss        scale = world * rows(micro) / all_reduce_sum(rows(mini))   # DDP/FSDP average gradients
    metrics     sums, counts, maxima all-reduced before rank 0 logs them

so ``world`` ranks on a global batch compute the update one process computes on it.

Models: the trainable one is sharded per transformer block and at its root with
``fully_shard`` (``strategy="fsdp"``) or wrapped in ``DistributedDataParallel``
(``"ddp"``); the frozen reference / reward models are sharded the same way or replicated.
Code that calls a sharded model other than through its root ``forward`` (``generate``, a
reference's trunk + LM head) runs inside ``gathered(model)``.

Checkpoints gather full state dicts to rank 0 (``get_model_state_dict(full_state_dict=True,
cpu_offload=True)``) and write them with ``checkpoint.save_checkpoint``: the files are those
of a single-process run, so any world size resumes them (``load_checkpoint`` broadcasts them
from rank 0 and each rank keeps its shard).

Any trainer (SFT, reward model, ...) can use the same pieces::

    init_distributed(cfg.device)                       # no-op outside torchrun
    device = rank_device(cfg.device)
    net, fwd = prepare_trainable(CallThrough(model, loss_fn), "fsdp", device)
    (fwd(batch) * world_size() * local_weight / all_reduce(local_weight)).backward()
    save_checkpoint(...) / load_checkpoint(...) / export_pretrained(net.module, ...)   # every rank
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rlhf_fast.trainer import checkpoint as ckpt

STRATEGIES = ("fsdp", "ddp")
FROZEN_SHARDING = ("shard", "replicate")
DEFAULT_TIMEOUT_S = 1800.0
_STATE = {"mesh": None, "hooks": False, "failed": False}


# ---------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """True once a default process group exists (torchrun, or the caller's own init)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(name: str = "auto") -> torch.device:
    """This rank's device: "auto" / "cuda" mean ``cuda:LOCAL_RANK`` under torchrun (one GPU per
    rank), "auto" is the CPU without CUDA; an explicit "cpu" or "cuda:N" is taken as is."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank() if is_distributed() or _launched() else torch.cuda.current_device())
    return dev


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> bool:
    """Joins the torchrun job when this process was launched with ``WORLD_SIZE > 1`` and no
    default process group exists yet; returns whether a process group exists afterwards.

    Backend NCCL when this rank's device is CUDA, else gloo. ``timeout_s`` bounds every
    collective (default: env ``RLHF_FAST_DIST_TIMEOUT_S`` or 30 min), so a rank whose peer died
    fails instead of hanging. Installs the exit handling of ``_install_exit_hooks``."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not _launched():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("RLHF_FAST_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    dev = rank_device(device)
    kw = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s), **kw)
    _install_exit_hooks()
    return True


def shutdown() -> None:
    """Barrier, then ``destroy_process_group`` (without the barrier gloo ranks that leave first
    sometimes abort the others at exit). A no-op when no process group exists."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()
    _STATE["mesh"] = None


def report_failure(exc: BaseException) -> None:
    """Prints ``[rank r/world] failed`` with the traceback to stderr (every rank, not only rank
    0) and records it in torchrun's error file, so the job summary names the first failure."""
    where = f"[rank {rank()}/{world_size()}]" if is_distributed() else f"[rank {os.environ.get('RANK', '?')}]"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    print(f"{where} failed:\n{text}", file=sys.stderr, flush=True)
    try:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        try:  # the handler formats the exception being handled (traceback.format_exc)
            raise exc
        except BaseException as e:
            get_error_handler().record_exception(e)
    except Exception:  # pragma: no cover - recording is best effort
        pass


@contextlib.contextmanager
def distributed_run(device: str = "auto", timeout_s: float | None = None):
    """The body of a torchrun entry point (a CLI's ``main``)::

        with distributed_run(cfg.device):
            trainer = PPOTrainer(...); trainer.train()

    Joins the job (``init_distributed``); on success leaves through ``shutdown`` (barrier +
    destroy); on an exception (or ``SystemExit`` with a non-zero code) reports it on this rank
    and re-raises without a barrier: the peers may be blocked in a collective, and torchrun
    stops them when this process exits non-zero."""
    init_distributed(device, timeout_s)
    try:
        yield
    except SystemExit as e:
        if e.code not in (0, None):
            _STATE["failed"] = True
        else:
            shutdown()
        raise
    except BaseException as e:
        _STATE["failed"] = True
        report_failure(e)
        e.__rlhf_fast_reported__ = True  # the excepthook does not print it again
        raise
    shutdown()


def _install_exit_hooks() -> None:
    """For trainers that joined the job by themselves: an unhandled exception is reported with
    its rank (``report_failure``) and skips the exit barrier; a clean exit runs ``shutdown``."""
    if _STATE["hooks"]:
        return
    _STATE["hooks"] = True

    def excepthook(tp, value, tb):  # replaces Python's printing of the traceback
        _STATE["failed"] = True
        if not getattr(value, "__rlhf_fast_reported__", False):
            report_failure(value)

    sys.excepthook = excepthook

    def at_exit():
        if not _STATE["failed"]:
            shutdown()

    atexit.register(at_exit)


# ---------------------------------------------------------------------------- collectives
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``x`` over all ranks ("sum" | "max" | "min"); ``x`` itself when not
    distributed. Tensors must live on this rank's device (CUDA under NCCL)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def global_moments(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True):
    """(count, mean, var) of the elements of ``x`` (any shape) where ``mask != 0``, over all
    ranks, in float64: two all-reduces (count and sum, then the sum of squared deviations from
    the global mean), so no cancellation. var is 0 below 2 (unbiased) or 1 element."""
    x = x.detach().double()
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    x = torch.where(valid, x, 0.0)
    n, s = all_reduce(torch.stack([valid.sum().double(), x.sum()])).unbind()
    mean = s / n.clamp(min=1)
    ss = all_reduce(torch.where(valid, (x - mean) ** 2, 0.0).sum())
    dof = n - 1 if unbiased else n
    var = torch.where(dof >= 1, ss / dof.clamp(min=1), torch.zeros_like(ss))
    return n, mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``rlhf_fast.masked_whiten(x, mask)`` with the mean and unbiased variance taken over every
    rank's valid positions: ``(x - mean) * rsqrt(var + eps)`` on the mask, 0 elsewhere (0 when
    fewer than 2 positions are valid)."""
    n, mean, var = global_moments(x, mask)
    rstd = torch.where(n >= 2, torch.rsqrt(var + eps), torch.zeros_like(var))
    out = ((x.double() - mean) * rstd).to(x.dtype)
    return torch.where(mask != 0, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------- models
def _mesh(device: torch.device):
    if _STATE["mesh"] is None:
        from torch.distributed.device_mesh import init_device_mesh

        _STATE["mesh"] = init_device_mesh(device.type, (world_size(),))
    return _STATE["mesh"]


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


def _fully_shard(model: nn.Module, device: torch.device) -> nn.Module:
    import warnings

    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device)
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
        model = _fully_shard(model, device)
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
    return _fully_shard(model, device)


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


# ---------------------------------------------------------------------------- checkpoints
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


def save_checkpoint(root, step: int, *, model, optimizer=None, scheduler=None, state=None, generators=None,
                    keep_last=2) -> Path | None:
    """``checkpoint.save_checkpoint`` for any world size: a single process saves as usual;
    under a process group every rank calls it, rank 0 writes the gathered full state (the same
    files a single process writes) and returns the path, other ranks return None."""
    if not is_distributed():
        return ckpt.save_checkpoint(root, step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                                    generators=generators, keep_last=keep_last)
    msd, osd = full_state_dicts(model, optimizer)
    path = None
    if rank() == 0:
        path = ckpt.save_checkpoint(root, step, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                                    generators=generators, keep_last=keep_last, model_state_dict=msd,
                                    optimizer_state_dict=osd)
    dist.barrier()  # the checkpoint is complete on disk when any rank goes on
    return path


def load_checkpoint(path, *, model, optimizer=None, scheduler=None, generators=None, map_location="cpu") -> dict:
    """``checkpoint.load_checkpoint`` for any world size. Under a process group only rank 0
    reads ``path`` (no shared file system needed); the model and optimizer states are broadcast
    from it and each rank keeps its shard, so a checkpoint of any world size loads into any
    other. Global RNG states are restored from the saved (rank 0) ones, CUDA's excepted."""
    if not is_distributed():
        return ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                    generators=generators, map_location=map_location)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = msd = osd = None
    if rank() == 0:
        if not (path / "trainer_state.pt").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.pt)")
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        msd = ckpt.read_model_weights(model, path / "model")
        if optimizer is not None:
            osd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
            osd = _optim_by_name(osd, _param_names(model, optimizer))
    state = broadcast_object(state)
    set_model_state_dict(model, msd or {}, options=_options(broadcast_from_rank0=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, osd or {}, options=_options(broadcast_from_rank0=True))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state({k: v for k, v in state["rng"].items() if k != "cuda"}, generators)
    return state


def export_pretrained(model: nn.Module, path, tokenizer=None) -> Path:
    """Writes ``model`` as a Hugging Face checkpoint (``save_pretrained``; a PolicyValueModel
    with its value head) and the tokenizer to ``path``. Under a process group every rank calls
    it and rank 0 writes the gathered full weights."""
    path = Path(path)
    if is_distributed():
        msd, _ = full_state_dicts(model)
        if rank() == 0:
            ckpt.save_model_weights(model, path, state_dict=msd)
    else:
        ckpt.save_model_weights(model, path)
    if rank() == 0 and tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    if is_distributed():
        dist.barrier()
    return path
