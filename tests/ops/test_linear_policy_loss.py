"""linear_ppo_policy_loss and linear_cross_entropy (gradients formed in the forward) against float64."""
import pytest
import torch
from helpers import assert_close_to_ref
from test_linear_logprobs import big_allocations, leaves, make_inputs

from rlhf_fast.ops.linear_logprobs import linear_token_logprobs_ref
from rlhf_fast.ops.linear_policy_loss import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_ppo_policy_loss,
    linear_ppo_policy_loss_ref,
)

ATOL = 3e-5

# every ppo_policy_loss option at least once (with the head options beside them)
OPTION_SETS = [
    dict(),
    dict(per_seq_adv=True, clip_eps_high=0.28, loss_agg="seq-mean-token-mean"),
    dict(dual_clip=3.0, kl_coef=0.1, kl_estimator="k3", use_ref=True, bias=True),
    dict(kl_coef=0.05, kl_estimator="k1", use_ref=True, entropy_coef=0.01, loss_agg="seq-mean-token-sum"),
    dict(kl_coef=0.2, kl_estimator="abs", use_ref=True, compute_entropy=True, loss_agg="seq-mean-token-sum-norm",
         max_tokens=10),
    dict(kl_coef=0.3, kl_estimator="k2", use_ref=True, on_policy=True, temperature=0.8, softcap=6.0,
         logit_scale=0.7, clip_eps=0.1),
    dict(use_ref=True, entropy_coef=-0.02, per_seq_adv=True, dual_clip=1.5, bias=True, logit_scale=1.4),
]


def ppo_inputs(B, T, H, V, dtype, o, seed):
    hidden, weight, bias, targets = make_inputs((B, T), H, V, dtype, bias=o.get("bias", False), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    head = dict(logit_scale=o.get("logit_scale", 1.0), softcap=o.get("softcap"))
    logp = linear_token_logprobs_ref(hidden.double(), weight.double(), targets,
                                     bias=None if bias is None else bias.double(),
                                     temperature=o.get("temperature", 1.0), **head).float()
    old = None if o.get("on_policy") else logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g) if o.get("per_seq_adv") else torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    if B > 1:
        mask[0] = False  # a row with no valid token
        mask[1, 0] = True
    else:
        mask[:] = True
    if old is not None:
        old = torch.where(mask, old, torch.full_like(old, float("nan")))  # masked entries are never read
    ref = logp + 0.2 * torch.randn(B, T, generator=g) if o.get("use_ref") else None
    ppo = {k: o[k] for k in ("clip_eps", "clip_eps_high", "dual_clip", "temperature", "kl_coef", "kl_estimator",
                             "entropy_coef", "loss_agg", "max_tokens", "compute_entropy") if k in o}
    return hidden, weight, bias, targets, old, adv, mask, dict(ppo, ref_logprobs=ref, **head)


def check_ppo(hidden, weight, bias, targets, old, adv, mask, kw, chunk_size, g_out=1.7):
    x = leaves(hidden, weight, bias)
    x64 = leaves(hidden, weight, bias, dtype=torch.float64)
    x32 = leaves(hidden, weight, bias)  # yardstick: the reference run from the inputs' dtype (fp32 math inside)
    loss, stats = linear_ppo_policy_loss(x[0], x[1], targets, old, adv, mask, bias=x[2], chunk_size=chunk_size, **kw)
    ref, ref_stats = linear_ppo_policy_loss_ref(x64[0], x64[1], targets, old, adv, mask, bias=x64[2], **kw)
    tor, tor_stats = linear_ppo_policy_loss_ref(x32[0], x32[1], targets, old, adv, mask, bias=x32[2], **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_to_ref(loss, ref, tor, atol=ATOL, name="loss")
    assert list(stats) == list(ref_stats)
    for k in stats:
        assert_close_to_ref(stats[k].double(), ref_stats[k].double(), tor_stats[k].double(), atol=ATOL, name=k)
    (loss * g_out).backward()
    (ref * g_out).backward()
    (tor * g_out).backward()
    for name, a, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64, x32):
        if a is not None:
            assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            assert_close_to_ref(a.grad, r.grad, t.grad, atol=ATOL, name=name)
    return loss, stats


@pytest.mark.parametrize("i", range(len(OPTION_SETS)))
def test_every_option_matches_float64(backend, i):
    o = OPTION_SETS[i]
    *args, kw = ppo_inputs(4, 5, 13, 307, torch.float32, o, seed=100 + i)
    check_ppo(*args, kw, chunk_size=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes_and_dtypes(backend, dtype):
    o = dict(dual_clip=2.0, kl_coef=0.1, use_ref=True, entropy_coef=0.01, bias=True, softcap=5.0)
    *args, kw = ppo_inputs(3, 7, 21, 1001, dtype, o, seed=7)
    check_ppo(*args, kw, chunk_size=4)  # 21 tokens, chunks of 4
    *args, kw = ppo_inputs(1, 1, 5, 97, dtype, dict(), seed=8)  # N = 1, default chunk
    check_ppo(*args, kw, chunk_size=None)


def test_grad_of_hidden_only_and_no_grad(backend):
    hidden, weight, bias, targets, old, adv, mask, kw = ppo_inputs(2, 6, 9, 200, torch.float32, dict(), seed=9)
    h = hidden.clone().requires_grad_()
    loss, _ = linear_ppo_policy_loss(h, weight, targets, old, adv, mask, chunk_size=5, **kw)
    loss.backward()
    h64 = hidden.double().requires_grad_()
    ref, _ = linear_ppo_policy_loss_ref(h64, weight.double(), targets, old, adv, mask, **kw)
    ref.backward()
    assert_close_to_ref(h.grad, h64.grad, atol=ATOL, name="grad_hidden")
    with torch.no_grad():
        loss2, _ = linear_ppo_policy_loss(h, weight, targets, old, adv, mask, chunk_size=5, **kw)
    assert not loss2.requires_grad
    assert_close_to_ref(loss2, ref, atol=ATOL, name="no-grad loss")


def test_backward_runs_once(backend):
    hidden, weight, bias, targets, old, adv, mask, kw = ppo_inputs(2, 3, 6, 50, torch.float32, dict(), seed=10)
    h = hidden.clone().requires_grad_()
    loss, _ = linear_ppo_policy_loss(h, weight, targets, old, adv, mask, **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def test_bad_arguments_name_the_argument():
    hidden, weight, bias, targets, old, adv, mask, kw = ppo_inputs(2, 3, 6, 50, torch.float32, dict(), seed=11)
    cases = [
        (dict(hidden=hidden[0]), "hidden"),
        (dict(mask=mask[:, :2]), "mask"),
        (dict(advantages=adv[:, :2]), "advantages"),
        (dict(old_logprobs=old[:1]), "old_logprobs"),
        (dict(kl_coef=0.1), "ref_logprobs"),
        (dict(loss_agg="mean"), "loss_agg"),
        (dict(clip_eps=0.0), "clip_eps"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(softcap=-1.0), "softcap"),
        (dict(advantages=torch.where(mask, float("nan"), adv)), "advantages"),
    ]
    for extra, name in cases:
        args = dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old, advantages=adv, mask=mask)
        args.update(extra)
        pos = [args.pop(k) for k in ("hidden", "weight", "targets", "old_logprobs", "advantages", "mask")]
        with pytest.raises((ValueError, TypeError), match=name):
            linear_ppo_policy_loss(*pos, **args)


def test_no_vocabulary_sized_allocations(backend):
    N, H, V = 64, 8, 4096  # N * V fp32 = 1 MiB; grad_weight (V, H) = 128 KiB
    o = dict(kl_coef=0.1, use_ref=True, entropy_coef=0.01, bias=True, softcap=9.0)
    hidden, weight, bias, targets, old, adv, mask, kw = ppo_inputs(4, N // 4, H, V, torch.float32, o, seed=12)
    x = leaves(hidden, weight, bias)

    def fwd_bwd():
        loss, _ = linear_ppo_policy_loss(x[0], x[1], targets, old, adv, mask, bias=x[2], chunk_size=8, **kw)
        torch.autograd.grad(loss, x)

    assert big_allocations(fwd_bwd, N * V) == []
    assert len(big_allocations(lambda: linear_ppo_policy_loss_ref(x[0], x[1], targets, old, adv, mask, bias=x[2],
                                                                  **kw), N * V)) >= 2


# ---------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_float64(backend, reduction, dtype):
    hidden, weight, bias, targets = make_inputs((3, 5), 11, 257, dtype, bias=True, seed=13)
    targets[0, :3] = -100
    targets[2, 4] = -100
    kw = dict(reduction=reduction, temperature=0.9, softcap=7.0, logit_scale=1.1)
    x, x64, x32 = leaves(hidden, weight, bias), leaves(hidden, weight, bias, dtype=torch.float64), \
        leaves(hidden, weight, bias)
    loss = linear_cross_entropy(x[0], x[1], targets, bias=x[2], chunk_size=4, **kw)
    ref = linear_cross_entropy_ref(x64[0], x64[1], targets, bias=x64[2], **kw)
    tor = linear_cross_entropy_ref(x32[0], x32[1], targets, bias=x32[2], **kw)
    assert_close_to_ref(loss, ref, tor, atol=ATOL, name="nll")
    for t in (loss, ref, tor):
        (t * 0.6).backward()
    for name, a, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), x, x64, x32):
        assert a.grad.dtype == dtype
        assert_close_to_ref(a.grad, r.grad, t.grad, atol=ATOL, name=name)


def test_cross_entropy_all_ignored_is_zero(backend):
    hidden, weight, _, targets = make_inputs((4,), 6, 40, torch.float32, seed=14)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, torch.full_like(targets, 7), ignore_index=7)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0
    with pytest.raises(IndexError, match="targets"):
        linear_cross_entropy(h, weight, targets + 40)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, weight, targets, reduction="none")


def assert_nan_masked_rows_change_nothing(loss_fn, hidden, weight, bias, valid):
    """``loss_fn(hidden, weight, bias) -> 0-d loss`` gives the same loss and the same gradients when
    the hidden states of rows outside ``valid`` are NaN (garbage padding): zeroed before any use."""
    runs = []
    for h in (hidden, torch.where(valid.unsqueeze(-1), hidden, float("nan"))):
        x = leaves(h, weight, bias)
        out = loss_fn(*x)
        out.backward()
        runs.append((out.detach(), *(t.grad for t in x if t is not None)))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# the objectives beyond the clipped token-level one (policy_objectives.py): two-pass, every option once
EXTENDED_SETS = [
    dict(ratio_level="sequence", clip_eps=0.1, loss_agg="seq-mean-token-mean"),
    dict(ratio_level="sequence_token", use_ref=True, kl_coef=0.1, kl_estimator="low_var_kl", compute_entropy=True),
    dict(loss_type="cispo", clip_eps_high=0.28, entropy_coef=0.01, bias=True),
    dict(loss_type="sapo", sapo_tau_pos=1.2, sapo_tau_neg=0.9, per_seq_adv=True, softcap=5.0, logit_scale=0.8),
    dict(correction="tis", correction_high=1.5, use_ref=True, kl_coef=0.2, kl_estimator="k3+", temperature=0.7),
    dict(correction="mis", correction_level="sequence", correction_low=0.5, correction_high=3.0, dual_clip=3.0),
    dict(correction="icepop", entropy_coef=-0.02, loss_agg="seq-mean-token-sum"),
]


@pytest.mark.parametrize("i", range(len(EXTENDED_SETS)))
def test_extended_objectives_match_float64(backend, i):
    o = EXTENDED_SETS[i]
    *args, kw = ppo_inputs(4, 5, 13, 307, torch.float32, o, seed=200 + i)
    kw.update({k: o[k] for k in ("ratio_level", "loss_type", "sapo_tau_pos", "sapo_tau_neg", "correction",
                                 "correction_level", "correction_low", "correction_high") if k in o})
    if "correction" in o:
        g = torch.Generator().manual_seed(300 + i)
        old = args[4] if args[4] is not None else torch.zeros(4, 5)
        kw["sampler_logprobs"] = torch.where(args[6], old + 0.4 * torch.randn(4, 5, generator=g), float("nan"))
    loss, stats = check_ppo(*args, kw, chunk_size=3)
    assert torch.isfinite(loss)
    if "correction" in o:
        assert "is_masked_frac" in stats
    hidden, weight, bias, targets, old, adv, mask = args
    assert_nan_masked_rows_change_nothing(
        lambda h, w, b: linear_ppo_policy_loss(h, w, targets, old, adv, mask, bias=b, chunk_size=3, **kw)[0],
        hidden, weight, bias, mask)


def test_full_kl_estimator_points_to_linear_full_kl():
    hidden, weight, bias, targets, old, adv, mask, kw = ppo_inputs(4, 3, 8, 50, torch.float32, dict(use_ref=True),
                                                                    seed=1)
    with pytest.raises(ValueError, match="linear_full_kl"):
        linear_ppo_policy_loss(hidden, weight, targets, old, adv, mask, bias=bias, kl_estimator="full", kl_coef=0.1,
                               **kw)


@pytest.mark.parametrize("i", [0, 2, 6])
def test_masked_rows_holding_nan_contaminate_nothing(backend, i):
    """NaN hidden states at masked positions (e.g. fully masked padding rows) change neither the
    loss nor any gradient: each row is zeroed before grad_weight = g.T @ hidden sees it."""
    hidden, weight, bias, targets, old, adv, mask, kw = ppo_inputs(4, 5, 13, 307, torch.float32, OPTION_SETS[i],
                                                                    seed=100 + i)
    assert_nan_masked_rows_change_nothing(
        lambda h, w, b: linear_ppo_policy_loss(h, w, targets, old, adv, mask, bias=b, chunk_size=3, **kw)[0],
        hidden, weight, bias, mask)
    ignored = torch.where(mask, targets, -100)
    assert_nan_masked_rows_change_nothing(
        lambda h, w, b: linear_cross_entropy(h, w, ignored, bias=b, chunk_size=3), hidden, weight, bias, mask)
