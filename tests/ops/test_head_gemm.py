"""head_gemm.mm_into: the LM head's fp32 GEMM into caller-owned buffers (csrc/cpu/linear.cpp where
built with AVX-512, else torch.mm), against float64: odd shapes, transposed and sliced operands,
beta = 0 (out never read) / 1 (accumulate), bias, non-finite inputs."""
import pytest
import torch

from rlhf_fast.ops import head_gemm
from rlhf_fast.ops.head_gemm import mm_into

SHAPES = [(1, 1, 1), (7, 33, 5), (41, 401, 1271), (9, 31, 257), (300, 1000, 600), (8, 4097, 3), (513, 65, 0)]


def operand(rows, cols, transposed, sliced, gen):
    if transposed:
        x = torch.randn(cols, rows, generator=gen).T
    else:
        x = torch.randn(rows, cols + 3 * sliced, generator=gen)[:, : cols]
    return x


@pytest.fixture(params=["auto", "torch"])
def gemm_path(request, monkeypatch):
    monkeypatch.setenv("RLHF_FAST_HEAD_GEMM", request.param)
    if request.param == "auto" and not head_gemm.native_gemm(torch.device("cpu")):
        pytest.skip("the C++ GEMM is not built or this CPU has no AVX-512")
    return request.param


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_mm_into_matches_float64(gemm_path, m, n, k, ta, tb):
    gen = torch.Generator().manual_seed(m * 7 + n * 3 + k)
    a, b = operand(m, k, ta, not ta, gen), operand(k, n, tb, not tb, gen)
    bias = torch.randn(n, generator=gen)
    ref = a.double() @ b.double()
    torch_err = ((a @ b).double() - ref).abs().max().item() if m * n and k else 0.0
    for beta in (0.0, 1.0):
        for bi in (None, bias):
            c0 = torch.randn(m, n, generator=gen)
            out = c0.clone() if beta else torch.full((m, n), float("nan"))  # beta = 0 never reads out
            res = mm_into(out, a, b, beta=beta, bias=bi)
            assert res is out
            want = ref + (c0.double() if beta else 0) + (0 if bi is None else bi.double())
            err = (out.double() - want).abs().max().item() if m * n else 0.0
            assert err <= 2 * torch_err + 1e-5, (gemm_path, m, n, k, ta, tb, beta, bi is not None, err, torch_err)


def test_mm_into_strided_out_and_nonfinite(gemm_path):
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 70, generator=gen), torch.randn(70, 45, generator=gen)
    a[3, 5], a[10, 0], b[2, 7] = float("inf"), float("nan"), -float("inf")
    big = torch.zeros(37, 60)
    out = big[:, 5:50]  # row stride 60, unit column stride
    mm_into(out, a, b)
    want = a @ b
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out.isinf(), want.isinf())
    fin = want.isfinite()
    torch.testing.assert_close(out[fin], want[fin], rtol=1e-5, atol=1e-4)
    assert big[:, :5].eq(0).all() and big[:, 50:].eq(0).all()  # nothing written outside the view


@pytest.mark.parametrize("nthreads", [2, 3])
@pytest.mark.parametrize("m,n,k", [(9, 31, 257), (5, 3, 300), (40, 70, 2000), (4, 6, 1000)])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, True)])
def test_mm_into_long_k_on_threads(gemm_path, monkeypatch, nthreads, m, n, k, ta, tb):
    """K >= 8 max(M, N) on several threads (grad_hidden's g @ W: K = V): the C++ GEMM splits K among
    the threads (more threads than K pieces at K = 300) and adds their partial products, bias and
    beta * out once."""
    monkeypatch.setattr(head_gemm._backend, "num_threads", lambda: nthreads)
    gen = torch.Generator().manual_seed(m + n + k + nthreads)
    a, b = operand(m, k, ta, not ta, gen), operand(k, n, tb, not tb, gen)
    bias = torch.randn(n, generator=gen)
    ref = a.double() @ b.double()
    torch_err = ((a @ b).double() - ref).abs().max().item()
    for beta, bi in ((0.0, None), (1.0, bias), (0.0, bias)):
        c0 = torch.randn(m, n, generator=gen)
        out = c0.clone() if beta else torch.full((m, n), float("nan"))
        mm_into(out, a, b, beta=beta, bias=bi)
        want = ref + (c0.double() if beta else 0) + (0 if bi is None else bi.double())
        err = (out.double() - want).abs().max().item()
        assert err <= 2 * torch_err + 1e-5, (nthreads, m, n, k, beta, bi is not None, err, torch_err)
