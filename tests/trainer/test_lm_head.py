"""lm_head="fused" (log-probs and losses from hidden states) against lm_head="materialize" (the LM
head's logits, then the logits ops): the model's head inputs, the rollout log-probs, and seeded
PPO / GRPO / SFT runs whose metrics and final weights agree to a tight tolerance. The LM head is
cut into chunks of 3 rows (RLHF_FAST_HEAD_CHUNK_BYTES), so the fused path really sums in another
order; a profiled fused step allocates nothing vocabulary-sized. The golden runs (test_golden.py)
pin materialize exactly and fused at tolerance."""
import pytest
import torch
import torch.nn.functional as F
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction, tiny_config

from rlhf_fast import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.metrics import read_jsonl
from rlhf_fast.trainer.model import response_hidden, response_logits
from rlhf_fast.trainer.rollout import rollout_logprobs
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu", seed=0)
UNTIMED = ("time/", "perf/")
V = tiny_config().vocab_size


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """3 rows per (C, V) chunk: several chunks per micro-batch."""
    monkeypatch.setenv("RLHF_FAST_HEAD_CHUNK_BYTES", str(3 * 4 * V * 2))


def assert_runs_close(a: list[dict], b: list[dict], rel=1e-4, abs_=1e-6):
    assert len(a) == len(b) and a
    for step, (x, y) in enumerate(zip(a, b)):
        x = {k: v for k, v in x.items() if not k.startswith(UNTIMED)}
        y = {k: v for k, v in y.items() if not k.startswith(UNTIMED)}
        assert set(x) == set(y)
        bad = {k: (x[k], y[k]) for k in x if x[k] != pytest.approx(y[k], rel=rel, abs=abs_, nan_ok=True)}
        assert not bad, (step, bad)


def assert_params_close(m1, m2):
    """Within 1e-5 absolute (weights are ~0.1): Adam at lr 3e-3 turns the ~1e-7 relative difference of
    the chunked LM head's summation order into ~2e-6 on weights whose gradients are near zero."""
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def rl_run(tmp_path, cls, config_cls, lm_head, value_head, **kw):
    cfg = config_cls(output_dir=str(tmp_path / lm_head), lm_head=lm_head, **kw, **QUIET)
    tr = cls(cfg, model=seeded_model(value_head=value_head), tokenizer=char_tokenizer(), reward_fn=target_fraction,
             prompts=PROMPTS)
    tr.train()
    return read_jsonl(tmp_path / lm_head / "metrics.jsonl"), tr.model


RL_RUNS = {
    "ppo": (PPOTrainer, PPOConfig, True, dict(total_steps=3, rollout_batch_size=4, mini_batch_size=4,
                                              micro_batch_size=2, ppo_epochs=2, max_new_tokens=8,
                                              learning_rate=3e-3, entropy_coef=0.01, temperature=0.9)),
    "grpo": (GRPOTrainer, GRPOConfig, False, dict(total_steps=3, rollout_batch_size=2, group_size=4,
                                                  mini_batch_size=8, micro_batch_size=4, num_iterations=2,
                                                  max_new_tokens=8, learning_rate=3e-3, beta=0.05,
                                                  clip_eps_high=0.28, entropy_coef=0.01, temperature=0.9,
                                                  gradient_checkpointing=True)),
    # the objectives beyond the clipped token-level one: the two-pass from-hidden path
    "grpo_objectives": (GRPOTrainer, GRPOConfig, False, dict(total_steps=2, rollout_batch_size=2, group_size=4,
                                                             mini_batch_size=8, micro_batch_size=4, num_iterations=2,
                                                             max_new_tokens=8, learning_rate=3e-3, beta=0.05,
                                                             loss_type="sapo", importance_sampling_level="sequence",
                                                             kl_estimator="low_var_kl", rollout_correction="tis",
                                                             temperature=0.9)),
}


@pytest.mark.parametrize("name", list(RL_RUNS))
def test_rl_run_fused_equals_materialize(name, tmp_path):
    cls, config_cls, value_head, kw = RL_RUNS[name]
    rec_f, model_f = rl_run(tmp_path, cls, config_cls, "fused", value_head, **kw)
    rec_m, model_m = rl_run(tmp_path, cls, config_cls, "materialize", value_head, **kw)
    assert_runs_close(rec_f, rec_m)
    assert_params_close(model_f, model_m)


def test_sft_run_fused_equals_materialize(tmp_path):
    from test_sft_rm import TOK, sft_data, tiny_lm

    data, out = sft_data(12), {}
    for lm_head in ("fused", "materialize"):
        cfg = SFTConfig(output_dir=str(tmp_path / lm_head), max_steps=3, batch_size=4, micro_batch_size=2,
                        lm_head=lm_head, eval_steps=0, **QUIET)
        t = SFTTrainer(cfg, model=tiny_lm(), tokenizer=TOK, train_data=data, eval_data=sft_data(4, seed=1))
        t.train()
        out[lm_head] = (read_jsonl(tmp_path / lm_head / "metrics.jsonl"), t.model)
    assert_runs_close(out["fused"][0], out["materialize"][0])
    assert_params_close(out["fused"][1], out["materialize"][1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_head_inputs_give_the_logits(kind):
    """return_hidden: (hidden, W, b) with F.linear(hidden, W, b) == the materialised logits, W the
    (tied) LM head weight itself, and gradients reaching it through the fused op."""
    model = seeded_model(kind).eval()  # GPT-2 has dropout
    ids = torch.randint(4, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    logits, _ = model(ids, mask, 5)
    (h, w, b, _, _), values = model(ids, mask, 5, return_hidden=True)
    assert h.shape == (3, 4, 32) and w.shape == (V, 32) and values.shape == (3, 4)
    head = model.policy.get_output_embeddings()
    assert w.data_ptr() == head.weight.data_ptr() and b is None
    torch.testing.assert_close(F.linear(h, w), logits, rtol=0, atol=0)
    torch.testing.assert_close(response_logits(model.policy, ids, mask, 5),
                               F.linear(*response_hidden(model.policy, ids, mask, 5)[:2]), rtol=0, atol=0)


def test_bias_and_non_linear_heads():
    model = seeded_model(value_head=False)
    lin = torch.nn.Linear(32, V, bias=True)
    torch.nn.init.normal_(lin.bias)
    model.policy.set_output_embeddings(lin)
    ids, mask = torch.randint(4, V, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    (h, w, b, _, _), _ = model(ids, mask, 3, with_values=False, return_hidden=True)
    assert b is not None
    torch.testing.assert_close(F.linear(h, w, b), model(ids, mask, 3, with_values=False)[0])
    model.policy.set_output_embeddings(torch.nn.Sequential(lin))
    with pytest.raises(TypeError, match="lm_head='fused' needs an nn.Linear"):
        model(ids, mask, 3, with_values=False, return_hidden=True)


def test_rollout_logprobs_fused_equals_materialize(tmp_path):
    cls, config_cls, _, kw = RL_RUNS["grpo"]
    tr = cls(config_cls(output_dir=str(tmp_path), **kw, **QUIET), model=seeded_model(value_head=False),
             tokenizer=char_tokenizer(), reward_fn=target_fraction, prompts=PROMPTS)
    batch = tr.sample(0, repeat=4)
    for model in (tr.model, tr.ref_model):
        a, _ = rollout_logprobs(model, batch, temperature=0.7, micro_batch_size=3, lm_head="fused")
        b, _ = rollout_logprobs(model, batch, temperature=0.7, micro_batch_size=3, lm_head="materialize")
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lm_head"):
        rollout_logprobs(tr.model, batch, temperature=1.0, micro_batch_size=3, lm_head="chunked")


@pytest.mark.parametrize("config_cls", [PPOConfig, GRPOConfig, SFTConfig])
def test_lm_head_is_validated_and_settable(config_cls):
    with pytest.raises(ConfigError, match=r"lm_head='chunked': must be one of 'fused', 'materialize'"):
        config_cls(lm_head="chunked")
    assert config_cls().lm_head == "fused"
    assert config_cls.from_dict({"lm_head": "materialize"}).lm_head == "materialize"


def test_cli_set_reaches_lm_head():
    from rlhf_fast.settings import resolve_settings

    for command, data in (("ppo", "prompts_file"), ("grpo", "prompts_file"), ("sft", "train_file")):
        cfg, _ = resolve_settings(command, None, ["lm_head=materialize", f"{data}=x.jsonl"], "tiny")
        assert cfg.lm_head == "materialize"


def big_allocations(fn, threshold_bytes):
    """Sizes of CPU allocations >= threshold made while fn runs (torch profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= threshold_bytes]


@pytest.mark.parametrize("lm_head", ["fused", "materialize"])
def test_fused_step_allocates_nothing_vocabulary_sized(tmp_path, monkeypatch, lm_head):
    """A GRPO experience + micro-batch loss/backward on 8 x 8 response tokens, V = 4096, H = 8:
    fused allocates nothing of N * V / 4 bytes (the (N, V) fp32 logits are 1 MiB, W is 128 KiB);
    materialize does (the yardstick)."""
    from rlhf_fast import PolicyValueModel

    vocab, rows = 4096, 64
    monkeypatch.setenv("RLHF_FAST_HEAD_CHUNK_BYTES", str(8 * 4 * vocab))
    cfg = tiny_config(vocab_size=vocab)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 8, 16, 2, 2
    torch.manual_seed(0)
    model = PolicyValueModel.from_config(cfg, value_head=False)
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), lm_head=lm_head, rollout_batch_size=2, group_size=4,
                                mini_batch_size=8, micro_batch_size=8, max_new_tokens=8, beta=0.1, **QUIET),
                     model=model, tokenizer=char_tokenizer(), reward_fn=target_fraction, prompts=PROMPTS)
    batch = tr.sample(0, repeat=4)
    assert int(batch.response_mask.sum()) >= rows - 8  # about 64 response tokens (EOS is rare at V = 4096)
    limit = rows * vocab * 4 // 4

    def step():
        b = tr.make_experience(0, batch=batch)
        tr.compute_advantages(b)
        loss, _ = tr.compute_loss(b.select(torch.arange(8)))
        loss.backward()

    big = big_allocations(step, limit)
    assert (big == []) if lm_head == "fused" else len(big) >= 2, big
