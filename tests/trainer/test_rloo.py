"""RLOOTrainer: advantages and gradient against a float64 loop of the RLOO paper's estimator
(KL-shaped reward, leave-one-out baseline, sequence-level REINFORCE), and a short run."""
import copy

import pytest
import torch
from rl_utils import PROMPTS, seeded_model, target_fraction

from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.model import response_logits
from rlhf_fast.trainer.rloo import RLOOConfig, RLOOTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")


def make(tmp_path, tokenizer, **kw):
    cfg = RLOOConfig(output_dir=str(tmp_path), **{**dict(total_steps=2, rollout_batch_size=2, group_size=4,
                                                       mini_batch_size=8, micro_batch_size=8, max_new_tokens=6,
                                                       beta=0.3, learning_rate=1e-3), **kw}, **QUIET)
    ref = seeded_model(value_head=False, seed=5).policy  # a reference that differs: the KL term is not 0
    return RLOOTrainer(cfg, model=seeded_model(value_head=False), ref_model=ref, tokenizer=tokenizer,
                       reward_fn=target_fraction, prompts=PROMPTS)


def test_advantages_and_gradient_match_float64_loop(tmp_path, tokenizer):
    torch.manual_seed(0)
    t = make(tmp_path, tokenizer)
    batch = t.make_experience(0)
    t.compute_advantages(batch)
    k, beta = 4, 0.3
    # the paper's estimator, one sequence at a time in float64
    scores = batch.scores.double().tolist()
    lp, ref, m = batch.logprobs.double(), batch.ref_logprobs.double(), batch.response_mask
    R = [scores[i] - beta * sum(float(lp[i, j] - ref[i, j]) for j in range(m.shape[1]) if m[i, j])
         for i in range(len(batch))]
    want = []
    for i in range(len(batch)):
        g = i // k
        others = [R[j] for j in range(g * k, (g + 1) * k) if j != i]
        want.append(R[i] - sum(others) / (k - 1))
    assert torch.allclose(batch.advantages.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(batch.rewards.double(), torch.tensor(R, dtype=torch.float64), atol=1e-5)
    assert float(torch.tensor(want).abs().max()) > 0  # the test can fail: advantages are not all 0

    # gradient: REINFORCE, -mean_i A_i * sum_t log pi(y_i,t), on a float64 copy of the policy
    policy64 = copy.deepcopy(t.model.policy).double()
    loss, _ = t.compute_loss(batch)
    (loss * 0.7).backward()
    logits = response_logits(policy64, batch.input_ids, batch.attention_mask, batch.response_start)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, batch.responses[..., None])[..., 0]
    A = torch.tensor(want, dtype=torch.float64)
    ref_loss = -(A * (logp * m).sum(-1)).mean()
    (ref_loss * 0.7).backward()
    for (name, p), p64 in zip(t.model.policy.named_parameters(), policy64.parameters()):
        if p64.grad is None:
            continue
        err = (p.grad.double() - p64.grad).abs().max()
        assert err <= 1e-4 * max(1.0, float(p64.grad.abs().max())), name


def test_short_run_and_metrics(tmp_path, tokenizer):
    t = make(tmp_path, tokenizer, total_steps=2)
    t.train()
    from rlhf_fast.trainer.metrics import read_jsonl

    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rec) == 2 and "reward/kl_shaped" in rec[-1] and "kl/ref" in rec[-1]
    assert (tmp_path / "final" / "config.json").is_file()


def test_config_errors():
    with pytest.raises(ConfigError, match="group_size"):
        RLOOConfig(group_size=1)
    with pytest.raises(ConfigError, match="scale"):
        RLOOConfig(scale="std")
    with pytest.raises(ConfigError, match="beta"):
        RLOOConfig(beta=-1.0)
    with pytest.raises(ConfigError, match="mini_batch_size"):
        RLOOConfig(rollout_batch_size=2, group_size=3, mini_batch_size=4, micro_batch_size=4)
