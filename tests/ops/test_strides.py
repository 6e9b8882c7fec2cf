"""Every op honours the strides of every tensor argument (issue 11, item 1): each argument in turn
is passed as a sliced, transposed, expanded (first or last dim) or storage-offset view, on the triton, cpu and torch
backends, and the result (and the gradient w.r.t. a differentiable argument) must match the op's
``*_ref`` on float64 contiguous copies of the same values."""
import pytest
import torch
from helpers import assert_close_to_ref

import rlhf_fast as rf
from rlhf_fast.ops.gae import kl_shaped_rewards_ref

B, T, V = 4, 9, 37
KINDS = ("sliced", "transposed", "expanded", "expanded_last", "offset")
BACKENDS = ("triton", "cpu", "torch")


def view_of(x: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous (or offset) view whose values equal x (for "expanded": x's first row repeated)."""
    if kind == "sliced":  # unit stride lost along the last dim
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    if kind == "transposed":  # the same values in the reverse memory order of the dims
        perm = list(range(x.dim()))[::-1]
        return x.permute(*perm).contiguous().permute(*perm)
    if kind == "expanded":  # stride 0 along the first dim
        return x[:1].expand_as(x)
    if kind == "expanded_last":  # stride 0 along the last dim (a broadcast column / vocabulary)
        return x[..., :1].expand_as(x)
    big = torch.zeros(x.numel() + 5, dtype=x.dtype)  # offset: contiguous, data_ptr != storage start
    big[5:] = x.reshape(-1)
    return big[5:].view(x.shape)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, -3:] = False
    return {
        "logits": torch.randn(B, T, V, generator=g) * 2, "ref_logits": torch.randn(B, T, V, generator=g) * 2,
        "targets": torch.randint(0, V, (B, T), generator=g), "logprobs": -torch.rand(B, T, generator=g) * 3,
        "ref_logprobs": -torch.rand(B, T, generator=g) * 3, "old_logprobs": -torch.rand(B, T, generator=g) * 3,
        "scores": torch.randn(B, generator=g), "values": torch.randn(B, T, generator=g),
        "old_values": torch.randn(B, T, generator=g), "returns": torch.randn(B, T, generator=g),
        "rewards": torch.randn(B, T, generator=g), "advantages": torch.randn(B, T, generator=g),
        "x": torch.randn(B, T, generator=g) * 3 + 1, "mask": mask,
        "chosen": torch.randn(B, generator=g), "rejected": torch.randn(B, generator=g),
        "pc": -torch.rand(B, generator=g), "pr": -torch.rand(B, generator=g),
        "rc": -torch.rand(B, generator=g), "rr": -torch.rand(B, generator=g),
    }


def _policy_ref(logits, targets, old_logprobs, advantages, mask, ref_logprobs):
    return rf.ppo_policy_loss_ref(logits, targets, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                                  kl_coef=0.1, entropy_coef=0.01)


# op name -> (arguments, op(backend, **args), ref(**args), differentiable argument or None, backends)
OPS = {
    "token_logprobs": (("logits", "targets"),
                       lambda b, **a: rf.token_logprobs(**a, return_entropy=True, backend=b),
                       lambda **a: rf.token_logprobs_ref(**a, return_entropy=True), "logits", BACKENDS),
    "kl_penalty": (("logprobs", "ref_logprobs"), lambda b, **a: rf.kl_penalty(**a, estimator="k3", backend=b),
                   lambda **a: rf.kl_penalty_ref(**a, estimator="k3"), "logprobs", BACKENDS),
    "full_kl": (("logits", "ref_logits"), lambda b, **a: rf.full_kl(**a, backend=b), rf.full_kl_ref, "logits",
                BACKENDS),
    "kl_shaped_rewards": (("scores", "logprobs", "ref_logprobs", "mask"),
                          lambda b, **a: rf.kl_shaped_rewards(**a, kl_coef=0.1, backend=b),
                          lambda **a: kl_shaped_rewards_ref(**a, kl_coef=0.1), None, BACKENDS),
    "gae": (("rewards", "values", "mask"), lambda b, **a: rf.gae(**a, gamma=0.9, lam=0.8, backend=b),
            lambda **a: rf.gae_ref(**a, gamma=0.9, lam=0.8), None, BACKENDS),
    "ppo_advantages": (("scores", "logprobs", "ref_logprobs", "values", "mask"),
                       lambda b, **a: rf.ppo_advantages(**a, kl_coef=0.1, backend=b),
                       lambda **a: rf.ppo_advantages_ref(**a, kl_coef=0.1), None, BACKENDS),
    "masked_whiten": (("x", "mask"), lambda b, **a: rf.masked_whiten(**a, backend=b), rf.masked_whiten_ref, None,
                      BACKENDS),
    "group_advantages": (("scores",), lambda b, scores: rf.group_advantages(scores, 2, scale="batch", backend=b),
                         lambda scores: rf.group_advantages_ref(scores, 2, "mean", "batch"), None, BACKENDS),
    "ppo_policy_loss": (("logits", "targets", "old_logprobs", "advantages", "mask", "ref_logprobs"),
                        lambda b, **a: rf.ppo_policy_loss(**a, kl_coef=0.1, entropy_coef=0.01, backend=b),
                        _policy_ref, "logits", BACKENDS),
    "value_loss": (("values", "old_values", "returns", "mask"),
                   lambda b, **a: rf.value_loss(**a, clip_eps=0.2, backend=b),
                   lambda **a: rf.value_loss(**a, clip_eps=0.2), "values", ("torch",)),
    "reward_model_loss": (("chosen", "rejected"),
                          lambda b, chosen, rejected: rf.reward_model_loss(chosen, rejected, backend=b),
                          lambda chosen, rejected: rf.reward_model_loss(chosen, rejected), "chosen", ("torch",)),
    "dpo_loss": (("pc", "pr", "rc", "rr"), lambda b, pc, pr, rc, rr: rf.dpo_loss(pc, pr, rc, rr, beta=0.5, backend=b),
                 lambda pc, pr, rc, rr: rf.dpo_loss(pc, pr, rc, rr, beta=0.5), "pc", ("torch",)),
}

CASES = [(op, arg, kind, b) for op, (args, _, _, _, backends) in OPS.items() for arg in args for kind in KINDS
         for b in backends]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for o in out for t in _tensors(o)]


@pytest.mark.parametrize("op,arg,kind,backend", CASES, ids=["-".join(c) for c in CASES])
def test_every_argument_any_layout(op, arg, kind, backend):
    names, fn, ref_fn, diff, _ = OPS[op]
    base = _inputs()
    args = {n: base[n] for n in names}
    args[arg] = view_of(args[arg], kind)
    assert not args[arg].is_contiguous() or args[arg].storage_offset() or kind == "transposed" and args[arg].dim() == 1
    # the reference sees contiguous float64 copies of the very same values
    ref_args = {n: (t.contiguous().double() if t.is_floating_point() else t.contiguous()) for n, t in args.items()}
    if diff is not None:
        args[diff] = args[diff].detach().requires_grad_()
        ref_args[diff].requires_grad_()
    out, want = _tensors(fn(backend, **args)), _tensors(ref_fn(**ref_args))
    assert len(out) == len(want)
    for i, (o, w) in enumerate(zip(out, want)):
        assert_close_to_ref(o.detach(), w.detach(), atol=2e-5 * max(1.0, float(w.detach().abs().max())),
                            name=f"{op} output {i}")
    if diff is not None:
        g = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad((out[0] * g).sum(), args[diff])
        (grad64,) = torch.autograd.grad((want[0] * g.double()).sum(), ref_args[diff])
        assert_close_to_ref(grad, grad64, atol=2e-5 * max(1.0, float(grad64.abs().max())), name=f"{op} grad")
