"""Fixtures of the trainer tests: every test runs single-threaded (tiny models gain nothing from
intra-op threads, and on a shared, oversubscribed CPU their synchronisation dominates); tiny
models and the character tokenizer come from ``rl_utils`` (also imported by the torchrun workers)."""
import pytest
import torch
from rl_utils import char_tokenizer, seeded_model


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def tokenizer():
    """The character tokenizer of rl_utils (pad=0, bos=1, eos=2)."""
    return char_tokenizer()


@pytest.fixture
def tiny_model():
    """A seeded tiny Llama PolicyValueModel (value head on)."""
    return seeded_model()
