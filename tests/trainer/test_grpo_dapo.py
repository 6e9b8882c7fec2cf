"""GRPO's issue-15 options on tiny CPU models: the objective options reach the loss, the sampler's
log-probs stand in for the old ones (no old forward), DAPO's dynamic sampling, overlong shaping
and overlong filtering."""
import pytest
import torch
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction

from rlhf_fast import GRPOConfig, GRPOTrainer, group_advantages_ref
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.grpo import overlong_penalty
from rlhf_fast.trainer.metrics import read_jsonl

QUIET = dict(progress_bar=False, tensorboard=False, plot=False)


def _trainer(tmp_path, reward_fn=target_fraction, **overrides):
    kw = dict(output_dir=str(tmp_path), total_steps=2, rollout_batch_size=4, group_size=4, mini_batch_size=8,
              micro_batch_size=4, max_new_tokens=8, learning_rate=3e-3, num_iterations=1, beta=0.01, seed=0, **QUIET)
    kw.update(overrides)
    return GRPOTrainer(GRPOConfig(**kw), model=seeded_model(value_head=False), tokenizer=char_tokenizer(),
                       reward_fn=reward_fn, prompts=PROMPTS)


@pytest.mark.parametrize("opts", [
    dict(loss_type="sapo", importance_sampling_level="sequence", rollout_correction="tis"),
    dict(loss_type="cispo", clip_eps=0.5, clip_eps_high=3.0, kl_estimator="k3+", rollout_correction="icepop"),
    dict(importance_sampling_level="sequence_token", kl_estimator="low_var_kl", rollout_correction="mis",
         rollout_correction_level="sequence", rollout_correction_high=10.0, use_sampler_logprobs_as_old=False),
])
def test_objective_options_train_and_log_mismatch(tmp_path, opts):
    _trainer(tmp_path, **opts).train()
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rec) == 2 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rec)
    # an fp32 sampler and an fp32 trainer: the same log-probs up to forward-vs-KV-cache rounding
    assert 0 <= rec[-1]["mismatch/mismatch_abs_max"] < 1e-3
    assert abs(rec[-1]["mismatch/is_ratio_p50"] - 1) < 1e-3


def test_sampler_logprobs_as_old_skips_the_old_forward(tmp_path, monkeypatch):
    import rlhf_fast.trainer.base as base

    calls = []
    real = base.rollout_logprobs
    monkeypatch.setattr(base, "rollout_logprobs", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    tr = _trainer(tmp_path, use_sampler_logprobs_as_old=True, beta=0.0)
    batch = tr.make_experience(0)
    assert calls == []  # beta = 0 and no old forward: no rollout forward at all
    assert batch.logprobs is batch.sampler_logprobs
    fwd = base.rollout_logprobs(tr.model, batch, temperature=1.0, micro_batch_size=4)[0]
    torch.testing.assert_close(batch.logprobs, fwd, rtol=0, atol=1e-5)
    tr.train()
    with pytest.raises(ConfigError, match="use_sampler_logprobs_as_old"):
        GRPOConfig(use_sampler_logprobs_as_old=True, num_iterations=2)
    with pytest.raises(ConfigError, match="use_sampler_logprobs_as_old"):
        GRPOConfig(use_sampler_logprobs_as_old=True, rollout_correction="tis")


def test_dynamic_sampling_drops_equal_groups(tmp_path):
    calls = {"n": 0}

    def reward(prompts, completions):  # the first round: every group all-equal but one; later rounds mixed
        calls["n"] += 1
        if calls["n"] == 1:
            return [1.0] * 12 + [0.0, 1.0, 0.0, 1.0]
        return [float(i % 2) for i in range(len(completions))]

    tr = _trainer(tmp_path, reward_fn=reward, dynamic_sampling=True, dynamic_sampling_max_tries=3)
    batch = tr.make_experience(0)
    assert len(batch) == 16 and calls["n"] == 2
    s = batch.scores.view(-1, 4)
    assert (s.amax(-1) > s.amin(-1)).all()
    assert tr.dynamic_stats == {"dynamic_sampling/dropped_groups": 3.0, "dynamic_sampling/tries": 2.0}
    assert batch.sampler_logprobs is None and batch.logprobs.shape == batch.response_mask.shape


def test_dynamic_sampling_out_of_tries_fills_with_equal_groups(tmp_path):
    tr = _trainer(tmp_path, reward_fn=lambda p, c: [0.5] * len(c), dynamic_sampling=True,
                  dynamic_sampling_max_tries=2)
    batch = tr.make_experience(0)
    assert len(batch) == 16
    assert tr.dynamic_stats["dynamic_sampling/dropped_groups"] == 8.0
    tr.compute_advantages(batch)
    assert (batch.advantages == 0).all()


def test_overlong_penalty_and_filtering(tmp_path):
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for i, n in enumerate((4, 6, 8, 10)):
        mask[i, :n] = True
    torch.testing.assert_close(overlong_penalty(mask, 10, 4, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(mask, 10, 0, 1.0), torch.zeros(4))

    tr = _trainer(tmp_path, overlong_buffer=4, overlong_penalty=0.5, mask_truncated_completions=True)
    batch = tr.make_experience(0)
    full_mask, scores = batch.response_mask.clone(), batch.scores.clone()
    tr.compute_advantages(batch)
    assert torch.equal(batch.scores, scores)  # the logged reward stays raw
    shaped = scores + overlong_penalty(full_mask, 8, 4, 0.5)
    assert not torch.equal(shaped, scores)
    torch.testing.assert_close(batch.advantages, group_advantages_ref(shaped, 4))
    assert torch.equal(batch.response_mask, full_mask & batch.has_eos[:, None])
    assert (~batch.has_eos).any(), "the tiny model should leave some completions truncated"
    with pytest.raises(ConfigError, match="overlong_buffer"):
        GRPOConfig(overlong_buffer=100, max_new_tokens=8)


def test_new_fields_are_reachable_from_the_cli():
    from rlhf_fast.cli import resolve_settings

    cfg, _ = resolve_settings("grpo", model="tiny", sets=["prompts_file=p.jsonl", "rollout_correction=icepop", "rollout_correction_high=none",
                                            "loss_type=sapo", "importance_sampling_level=sequence",
                                            "dynamic_sampling=true", "overlong_buffer=4", "kl_estimator=k3+"])
    assert (cfg.rollout_correction, cfg.rollout_correction_high, cfg.loss_type, cfg.dynamic_sampling,
            cfg.overlong_buffer, cfg.kl_estimator) == ("icepop", None, "sapo", True, 4, "k3+")
    assert cfg.loss_agg == "seq-mean-token-mean"
    with pytest.raises(Exception, match="rollout_correction"):
        resolve_settings("grpo", model="tiny", sets=["prompts_file=p.jsonl", "rollout_correction=bogus"])
