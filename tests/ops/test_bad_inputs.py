"""Bad input to every op family: each case asserts the exact error class and that the message
names the argument."""
import pytest
import torch

from rlhf_fast import gae, group_advantages, kl_shaped_rewards, masked_whiten, ppo_advantages


# ---------------------------------------------------------------------------- errors, fallback
def test_bad_input_names_the_argument():
    B, T = 2, 5
    s, x, m = torch.randn(B), torch.randn(B, T), torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="values"):
        gae(x, torch.randn(B, T + 1), m)
    with pytest.raises(ValueError, match="mask"):
        gae(x, x, m[:, 1:])
    with pytest.raises(TypeError, match="mask"):
        gae(x, x, [[1] * T] * B)
    with pytest.raises(ValueError, match="rewards"):
        gae(torch.randn(B * T), x, m)
    for name, kw in (("gamma", {"gamma": 1.5}), ("lam", {"lam": -0.1}), ("gamma", {"gamma": float("nan")}),
                     ("lam", {"lam": float("inf")})):
        with pytest.raises(ValueError, match=name):
            gae(x, x, m, **kw)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_shaped_rewards(s, x, x, m, kl_coef=float("nan"))
    with pytest.raises(ValueError, match="estimator"):
        kl_shaped_rewards(s, x, x, m, kl_coef=0.1, estimator="k4")
    with pytest.raises(ValueError, match="scores"):
        kl_shaped_rewards(torch.randn(B + 1), x, x, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_advantages(s, x, x[:, :-1], x, m, kl_coef=0.1)
    with pytest.raises(ValueError, match="values"):
        ppo_advantages(s, x, x, x[:1], m, kl_coef=0.1)
    with pytest.raises(ValueError, match="gamma"):
        ppo_advantages(s, x, x, x, m, kl_coef=0.1, gamma=2.0)
    with pytest.raises(ValueError, match="mask"):
        masked_whiten(x, m[:1])
    with pytest.raises(ValueError, match="eps"):
        masked_whiten(x, m, eps=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 1, scale="group")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(10), 1, baseline="leave_one_out", scale="none")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(torch.randn(10), 2, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(10), 2, scale="global")
    with pytest.raises(ValueError, match="scores"):
        group_advantages(torch.randn(2, 5), 5)

