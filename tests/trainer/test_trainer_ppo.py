"""PPOTrainer on tiny CPU models: it learns, resumes exactly, stops on non-finite gradients, and
its loss is the reference composition of the *_ref ops."""
import math

import pytest
import torch
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction, tiny_config
from transformers import AutoModelForCausalLM

from rlhf_fast import PPOConfig, PPOTrainer, ppo_advantages_ref, ppo_policy_loss_ref, token_logprobs_ref, value_loss
from rlhf_fast.trainer.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_fast.trainer.metrics import read_jsonl
from rlhf_fast.trainer.model import position_ids_from_mask
from rlhf_fast.trainer.runtime import NonFiniteError

QUIET = dict(progress_bar=False, tensorboard=False, plot=False)



def _trainer(tmp_path, model=None, reward_fn=target_fraction, **overrides):
    kw = dict(output_dir=str(tmp_path), total_steps=4, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2,
              max_new_tokens=6, learning_rate=3e-3, ppo_epochs=2, kl_coef=0.05, seed=0, **QUIET)
    kw.update(overrides)
    return PPOTrainer(PPOConfig(**kw), model=model if model is not None else seeded_model(),
                      tokenizer=char_tokenizer(), reward_fn=reward_fn, prompts=PROMPTS)


@pytest.mark.parametrize("separate_critic", [False, True])
def test_ppo_raises_the_reward(tmp_path, separate_critic):
    model = seeded_model(separate_critic=separate_critic)
    critic_before = [p.detach().clone() for p in (model.critic or model.policy).parameters()]
    tr = _trainer(tmp_path, model, total_steps=20, rollout_batch_size=16, mini_batch_size=8, micro_batch_size=4,
                  max_new_tokens=8, kl_coef=0.01, vf_coef=0.5, progress_bar=False, tensorboard=True, plot=True)
    tr.train()
    rec = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec] == list(range(1, 21))
    first = sum(r["reward/mean"] for r in rec[:3]) / 3
    last = sum(r["reward/mean"] for r in rec[-3:]) / 3
    assert first < 0.2 and last > first + 0.4, (first, last)  # chance is 1/15 per character
    for key in ("reward/std", "kl/ref", "policy/entropy", "policy/clip_frac", "policy/approx_kl", "loss/policy",
                "loss/value", "value/explained_variance", "response/length", "perf/tokens_per_s",
                "time/rollout_s", "time/update_s", "grad_norm", "kl/coef", "lr"):
        assert key in rec[-1], key
    assert rec[-1]["policy/entropy"] < rec[0]["policy/entropy"]
    assert max(r["value/explained_variance"] for r in rec[-5:]) > 0  # the critic learns something
    moved = [not torch.equal(a, b) for a, b in zip(critic_before, (model.critic or model.policy).parameters())]
    assert all(moved)
    assert (tmp_path / "metrics.png").exists() and (tmp_path / "tensorboard").is_dir()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step-000020"
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # the export is a plain HF checkpoint


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    opts = dict(total_steps=4, save_steps=2, adaptive_kl=True, kl_target=0.5, kl_horizon=50, warmup_steps=2,
                lr_scheduler="linear")
    full = _trainer(tmp_path / "full", **opts)
    full.train()
    expected = _comparable(read_jsonl(tmp_path / "full" / "metrics.jsonl"))

    calls = []

    def crashing(prompts, completions):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash in step 3")
        return target_fraction(prompts, completions)

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", reward_fn=crashing, **opts).train()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-000002"
    with pytest.warns(UserWarning, match="changed config fields: learning_rate"):
        _trainer(tmp_path / "run", resume_from="latest", **{**opts, "learning_rate": 1e-3})
    resumed = _trainer(tmp_path / "run", resume_from="latest", **opts)
    assert resumed.step == 2 and resumed.kl_ctl.value != 0.05  # adapted coefficient restored
    resumed.train()
    got = _comparable(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got == expected  # exact, every metric of every step
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_non_finite_gradient_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    tr = _trainer(tmp_path, total_steps=3, save_steps=1)
    tr.model.value_head.weight.register_hook(lambda g: g * math.nan if tr.step == 1 else g)
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient norm.*step-000001"):
        tr.train()
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "step-000001"
    assert load_checkpoint(path, model=seeded_model())["step"] == 1


def test_loss_equals_reference_composition_on_a_captured_batch(tmp_path):
    tr = _trainer(tmp_path, temperature=0.8, entropy_coef=0.01, vf_clip=0.2, kl_estimator="k3", gamma=0.99, lam=0.9)
    cfg, model = tr.config, tr.model
    batch = tr.make_experience(0)
    tr.compute_advantages(batch)
    mask, P = batch.response_mask, batch.response_start
    # rollout quantities against the references, from one full (all-position) HF forward
    with torch.no_grad():
        out = model.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=position_ids_from_mask(batch.attention_mask), output_hidden_states=True)
        old_ref = token_logprobs_ref(out.logits[:, P - 1 : -1], batch.responses, cfg.temperature)
        ref_out = tr.ref_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=position_ids_from_mask(batch.attention_mask)).logits
        refl = token_logprobs_ref(ref_out[:, P - 1 : -1], batch.responses, cfg.temperature)
    torch.testing.assert_close(batch.logprobs[mask], old_ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.ref_logprobs[mask], refl[mask], rtol=1e-5, atol=1e-5)
    adv, ret, rew = ppo_advantages_ref(batch.scores, batch.logprobs, batch.ref_logprobs, batch.values, mask,
                                       kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam, estimator="k3", whiten=True)
    for a, b in ((batch.advantages, adv), (batch.returns, ret), (batch.rewards, rew)):
        torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5)

    mb = batch.select(torch.tensor([5, 0, 3]))
    loss, stats = tr.compute_loss(mb)
    # before any update the loss's log-probs (trimmed micro-batch, same temperature) are the sampler's
    assert abs(float(stats["policy/ratio_mean"]) - 1) < 1e-5 and float(stats["policy/approx_kl"]) < 1e-9
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    out = model.policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       position_ids=position_ids_from_mask(mb.attention_mask), output_hidden_states=True)
    logits = out.logits[:, mb.response_start - 1 : -1]
    values = model.value_head(out.hidden_states[-1][:, mb.response_start - 1 : -1]).squeeze(-1)
    pg, _ = ppo_policy_loss_ref(logits, mb.responses, mb.logprobs, mb.advantages, mb.response_mask,
                                clip_eps=cfg.clip_eps, temperature=cfg.temperature, entropy_coef=cfg.entropy_coef,
                                loss_agg=cfg.loss_agg)
    vf, _ = value_loss(values, mb.values, mb.returns, mb.response_mask, clip_eps=cfg.vf_clip)
    ref_loss = pg + cfg.vf_coef * vf
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_reward_model_no_pad_token_grad_checkpointing_and_missing_eos_penalty(tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config()
    cfg.num_labels = 1
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_config(cfg)
    tr = PPOTrainer(PPOConfig(output_dir=str(tmp_path), total_steps=1, rollout_batch_size=4, mini_batch_size=4,
                              micro_batch_size=2, max_new_tokens=3, missing_eos_penalty=2.0, gradient_checkpointing=True,
                              ppo_epochs=1, **QUIET),
                    model=seeded_model(), tokenizer=char_tokenizer(pad=False), reward_model=rm, prompts=PROMPTS)
    assert getattr(tr.model.policy, "is_activation_checkpointing", None) or tr.model.policy.is_gradient_checkpointing
    batch = tr.sample(0)
    assert tr.pad_id == tr.eos_id == 2
    from rlhf_fast.trainer.rollout import reward_model_scores

    expect = reward_model_scores(rm, batch.input_ids, batch.attention_mask) - 2.0 * (~batch.has_eos).float()
    torch.testing.assert_close(batch.scores, expect)
    tr.train()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["step"] == 1


def test_constructor_errors():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="exactly one of reward_fn"):
        PPOTrainer(PPOConfig(**QUIET), model=seeded_model(), tokenizer=tok, prompts=PROMPTS)
    with pytest.raises(TypeError, match="config must be a PPOConfig"):
        from rlhf_fast import GRPOConfig

        PPOTrainer(GRPOConfig(), model=seeded_model(), tokenizer=tok, prompts=PROMPTS, reward_fn=target_fraction)
    with pytest.raises(ValueError, match="needs a PolicyValueModel with a value head"):
        PPOTrainer(PPOConfig(**QUIET), model=seeded_model(value_head=False), tokenizer=tok, prompts=PROMPTS,
                   reward_fn=target_fraction)
    with pytest.raises(ValueError, match="max_prompt_length"):
        PPOTrainer(PPOConfig(max_prompt_length=2, prompt_truncation="error", **QUIET), model=seeded_model(),
                   tokenizer=tok, prompts=PROMPTS, reward_fn=target_fraction)
    with pytest.raises(ValueError, match="max_new_tokens=200 exceeds the model's max_position_embeddings=128"):
        PPOTrainer(PPOConfig(max_new_tokens=200, **QUIET), model=seeded_model(), tokenizer=tok, prompts=PROMPTS,
                   reward_fn=target_fraction)
    model = seeded_model()
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        PPOTrainer(PPOConfig(**QUIET), model=model, ref_model=model.policy, tokenizer=tok, prompts=PROMPTS,
                   reward_fn=target_fraction)


def test_adam_impl_auto_is_fused_and_every_impl_trains_alike(tmp_path):
    """adam_impl="auto" picks torch's fused AdamW on CPU; fused, foreach and for_loop give the same
    weights after two PPO steps (same math, last-bit differences only); a bad value names the field."""
    params = {}
    for impl in ("auto", "fused", "foreach", "for_loop"):
        t = _trainer(tmp_path / impl, total_steps=2, adam_impl=impl)
        group = t.optimizer.param_groups[0]
        assert group["fused"] is (True if impl in ("auto", "fused") else None)
        assert group["foreach"] is {"auto": None, "fused": None, "foreach": True, "for_loop": False}[impl]
        t.train()
        params[impl] = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    assert not torch.equal(params["auto"], torch.cat([p.detach().flatten() for p in seeded_model().parameters()]))
    for impl in ("fused", "foreach", "for_loop"):
        torch.testing.assert_close(params[impl], params["auto"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="adam_impl"):
        PPOConfig(adam_impl="sgd")
