"""pytest-benchmark entry: `pytest benchmarks/ --benchmark-enable` (disabled by default)."""
import pytest
import torch
from bench_logprobs import providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", ["rlhf_fast", "torch", "trl"])
def test_logprobs_forward(benchmark, name):
    n, v = (4096, 32000) if DEVICE == "cpu" else (16384, 151936)
    logits = torch.randn(n, v, device=DEVICE)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    fn = providers(DEVICE)[name]
    benchmark(lambda: fn(logits, targets))
