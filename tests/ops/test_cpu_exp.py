"""The C++ kernels' exp (common.h fast_exp, common.h exp_wide) against float64 over the float range.

Every 211th float32 bit pattern (about 20 million values: every exponent, both signs, subnormals, infinities,
NaN payloads) plus every float near the range ends. The contract:
  - relative error <= MAX_ULP ulp wherever exp(x) is a normal float;
  - below that (exp(x) < 2^-126) an absolute error < 2^-126: flushed to 0 or subnormal, never more;
  - exp(-inf) = 0 and exp(+-0) = exp(subnormal) = 1 exactly, NaN for every NaN;
  - fast_exp's domain ends at kExpHi = 88.376 (the softmax kernels call it on z - max <= 0); exp_wide covers
    the whole range: finite up to ln(FLT_MAX) = 88.7228, +inf above it and for +inf.
"""
import numpy as np
import pytest
import torch

C = pytest.importorskip("rlhf_fast._C", reason="the C++ extension is not built")

MAX_ULP = {False: 1.5, True: 1.5}  # measured: fast_exp 0.91, exp_wide 0.88
EXP_HI = np.float32(88.3762626)  # common.h kExpHi
TINY = 2.0**-126
FLT_MAX = float(np.finfo(np.float32).max)


def _exp(x, any_range):
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = torch.full_like(x, 12345.0)
    C.exp_values(x.data_ptr(), out.data_ptr(), x.numel(), any_range)
    return out.numpy().astype(np.float64)


def _inputs(any_range):
    bits = np.arange(0, 2**32, 211, dtype=np.uint64).astype(np.uint32)
    ends = [np.arange(np.float32(a).view(np.uint32), np.float32(b).view(np.uint32), dtype=np.uint32)
            for a, b in ((-87.2, -87.5), (-103.0, -104.5), (88.3, 88.8))]  # ascending bit patterns
    special = np.array([np.inf, -np.inf, np.nan], dtype=np.float32).view(np.uint32)
    x = np.concatenate([bits, *ends, special]).view(np.float32)
    return x if any_range else x[~(x > EXP_HI)]


def _check(x, y, any_range):
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.exp(x.astype(np.float64))
    nan = np.isnan(x)
    assert np.isnan(y[nan]).all(), "a NaN input must give NaN"
    x, y, want = x[~nan], y[~nan], want[~nan]
    normal = (want >= TINY) & (want <= FLT_MAX)
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    err = np.abs(y[normal] - want[normal]) / ulp
    if err.size:
        i = int(np.argmax(err))
        assert err[i] <= MAX_ULP[any_range], f"exp({x[normal][i]!r}) = {y[normal][i]!r}, want {want[normal][i]!r}"
    under = want < TINY
    assert (np.abs(y[under] - want[under]) < TINY).all() and (y[under] >= 0).all()
    over = want > FLT_MAX
    assert np.isposinf(y[over]).all(), "exp_wide must overflow to +inf beyond ln(FLT_MAX)"


@pytest.mark.parametrize("any_range", [False, True], ids=["fast_exp", "exp_wide"])
def test_exp_against_float64(any_range):
    x = _inputs(any_range)
    assert (x < -104).any() and (np.abs(x) < 1e-38).any() and np.isneginf(x).any()  # the sweep reaches every part
    _check(x, _exp(x, any_range), any_range)


@pytest.mark.parametrize("any_range", [False, True], ids=["fast_exp", "exp_wide"])
def test_exp_special_values(any_range):
    sub = np.array([1, 2**23 - 1], dtype=np.uint32).view(np.float32)  # the smallest and largest subnormal
    x = np.array([0.0, -0.0, *sub, *-sub, -np.inf, -1e30, -87.34, np.nan, -np.nan], dtype=np.float32)
    y = _exp(x, any_range)
    assert (y[:6] == 1.0).all() and (y[6:9] == 0.0).all() and np.isnan(y[9:]).all(), y
    if any_range:
        y = _exp(np.array([np.inf, 1e30, 88.7229, 88.7228], dtype=np.float32), True)
        assert np.isposinf(y[:3]).all() and np.isfinite(y[3]), y


def test_the_check_catches_errors():
    """The checker fails a 3-ulp error, a subnormal result that is too large, and a missing overflow."""
    x = np.array([1.0, 0.5], dtype=np.float32)
    y = np.exp(x.astype(np.float64))
    with pytest.raises(AssertionError):
        _check(x, y * (1 + 3 * 2.0**-23), False)
    with pytest.raises(AssertionError):
        _check(np.array([-100.0], np.float32), np.array([2 * TINY]), False)
    with pytest.raises(AssertionError):
        _check(np.array([89.0], np.float32), np.array([FLT_MAX]), True)
