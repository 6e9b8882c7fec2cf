"""GRPOTrainer on tiny CPU models: it learns, groups are built right, and its loss is the
reference composition of the *_ref ops."""
import pytest
import torch
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction

from rlhf_fast import GRPOConfig, GRPOTrainer, group_advantages_ref, ppo_policy_loss_ref
from rlhf_fast.trainer.metrics import read_jsonl
from rlhf_fast.trainer.model import position_ids_from_mask

QUIET = dict(progress_bar=False, tensorboard=False, plot=False)


def _trainer(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), total_steps=4, rollout_batch_size=4, group_size=4, mini_batch_size=8,
              micro_batch_size=4, max_new_tokens=8, learning_rate=3e-3, num_iterations=2, beta=0.01, seed=0, **QUIET)
    kw.update(overrides)
    return GRPOTrainer(GRPOConfig(**kw), model=seeded_model(value_head=False), tokenizer=char_tokenizer(),
                       reward_fn=target_fraction, prompts=PROMPTS)


def test_grpo_raises_the_reward(tmp_path):
    _trainer(tmp_path, total_steps=20).train()
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    first = sum(r["reward/mean"] for r in rec[:3]) / 3
    last = sum(r["reward/mean"] for r in rec[-3:]) / 3
    assert first < 0.2 and last > first + 0.4, (first, last)
    for key in ("kl/ref", "policy/entropy", "policy/clip_frac", "policy/approx_kl", "policy/kl_k3", "loss/policy",
                "response/length", "perf/tokens_per_s", "time/rollout_s", "time/update_s"):
        assert key in rec[-1], key


def test_groups_are_consecutive_copies_of_one_prompt(tmp_path):
    tr = _trainer(tmp_path, baseline="leave_one_out", scale="batch")
    batch = tr.make_experience(0)
    tr.compute_advantages(batch)
    G = tr.config.group_size
    prompts = [batch.prompts[i : i + G] for i in range(0, len(batch), G)]
    assert all(len(set(g)) == 1 for g in prompts) and len({g[0] for g in prompts}) == tr.config.rollout_batch_size
    assert batch.input_ids[:G, : batch.response_start].unique(dim=0).shape[0] == 1
    torch.testing.assert_close(batch.advantages, group_advantages_ref(batch.scores, G, "leave_one_out", "batch"))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_loss_equals_reference_composition_on_a_captured_batch(tmp_path, loss_type):
    tr = _trainer(tmp_path, temperature=0.9, beta=0.05, clip_eps_high=0.28, entropy_coef=0.01, loss_type=loss_type)
    cfg, model = tr.config, tr.model
    batch = tr.make_experience(0)
    tr.compute_advantages(batch)
    torch.testing.assert_close(batch.advantages, group_advantages_ref(batch.scores, cfg.group_size))
    mb = batch.select(torch.tensor([7, 1, 12, 4]))
    loss, _ = tr.compute_loss(mb)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = model.policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                          position_ids=position_ids_from_mask(mb.attention_mask)).logits[:, mb.response_start - 1 : -1]
    ref_loss, _ = ppo_policy_loss_ref(logits, mb.responses, mb.logprobs, mb.advantages, mb.response_mask,
                                      clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                      temperature=cfg.temperature, ref_logprobs=mb.ref_logprobs, kl_coef=cfg.beta,
                                      kl_estimator="k3", entropy_coef=cfg.entropy_coef, loss_agg=cfg.loss_agg,
                                      max_tokens=cfg.max_new_tokens)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_beta_zero_skips_the_reference_and_plain_causal_lm_is_accepted(tmp_path):
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), total_steps=1, rollout_batch_size=2, group_size=2,
                                mini_batch_size=4, micro_batch_size=2, max_new_tokens=4, beta=0.0, **QUIET),
                     model=seeded_model(value_head=False).policy, tokenizer=char_tokenizer(),
                     reward_fn=target_fraction, prompts=PROMPTS)
    batch = tr.make_experience(0)
    assert batch.ref_logprobs is None and tr.model.value_head is None
    tr.train()
    assert "kl/ref" not in read_jsonl(tmp_path / "metrics.jsonl")[0]
