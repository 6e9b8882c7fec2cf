"""Trainer building blocks: config validation, KL controller, LR schedule, prompt encoding and
padding, completion masks, reward-model scoring, exact loss normalisation over micro-batches."""
import math

import pytest
import torch
from rl_utils import char_tokenizer, seeded_model, tiny_config
from transformers import AutoModelForSequenceClassification

from rlhf_fast import GRPOConfig, PPOConfig
from rlhf_fast.ops.policy_loss import ppo_policy_loss_ref
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.kl_controller import KLController
from rlhf_fast.trainer.rollout import (
    Rollout,
    completion_mask,
    encode_prompts,
    left_pad,
    reward_model_scores,
    special_ids,
)
from rlhf_fast.trainer.runtime import lr_multiplier


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("field, value, match", [
    ("learning_rate", 0.0, "PPOConfig.learning_rate=0.0: must be > 0"),
    ("temperature", -1.0, "PPOConfig.temperature"),
    ("mini_batch_size", 3, "PPOConfig.mini_batch_size=3: must divide the 8"),
    ("micro_batch_size", 3, "PPOConfig.micro_batch_size=3: must divide mini_batch_size"),
    ("lam", 1.5, "PPOConfig.lam"),
    ("kl_estimator", "k9", "PPOConfig.kl_estimator"),
    ("loss_agg", "sum", "PPOConfig.loss_agg"),
    ("ppo_epochs", "4", "PPOConfig.ppo_epochs='4': must be int"),
    ("total_steps", True, "PPOConfig.total_steps=True: must be int"),
    ("vf_coef", float("nan"), "PPOConfig.vf_coef=nan: must be finite"),
    ("precision", "fp8", "PPOConfig.precision"),
    ("attn_implementation", "flash", "PPOConfig.attn_implementation"),
])
def test_ppo_config_errors_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(".", r"\.")):
        PPOConfig(**{field: value})


def test_grpo_config_rules_and_from_dict():
    cfg = GRPOConfig(rollout_batch_size=2, group_size=4, mini_batch_size=4, micro_batch_size=2, learning_rate=1)
    assert cfg.sequences_per_step == 8 and cfg.loss_agg == "seq-mean-token-mean" and cfg.learning_rate == 1.0
    assert GRPOConfig(loss_type="dr_grpo").loss_agg == "seq-mean-token-sum-norm"
    assert GRPOConfig(loss_type="dapo").loss_agg == "token-mean"
    with pytest.raises(ConfigError, match="GRPOConfig.group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="GRPOConfig.clip_eps_high"):
        GRPOConfig(clip_eps=0.2, clip_eps_high=0.1)
    with pytest.raises(ConfigError, match="GRPOConfig.loss_agg"):
        GRPOConfig(loss_type="grpo", loss_agg="token-mean")
    with pytest.raises(ConfigError, match="unknown field.*bogus"):
        GRPOConfig.from_dict({"bogus": 1})
    again = GRPOConfig.from_dict(GRPOConfig(loss_type="bnpo", clip_eps_high=0.28).to_dict())
    assert again.loss_type == "bnpo" and again.clip_eps_high == 0.28


# ---------------------------------------------------------------------------- KL controller, LR
def test_adaptive_kl_controller_follows_ziegler():
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    v = ctl.value
    ctl.update(5.4, 10)  # error -0.1
    assert ctl.value == pytest.approx(v * (1 - 0.1 * 10 / 100))
    fixed = KLController(0.1)
    assert fixed.update(100.0, 10) == 0.1
    other = KLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value and other.adaptive
    with pytest.raises(ValueError, match="init_kl_coef"):
        KLController(-1.0)


def test_lr_warmup_and_decay():
    f = dict(warmup=4, total=14, min_ratio=0.1)
    assert [lr_multiplier(s, schedule="constant", **f) for s in (0, 3, 4, 13)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_multiplier(4, schedule="linear", **f) == 1.0
    assert lr_multiplier(9, schedule="linear", **f) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(14, schedule="cosine", **f) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **f) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


# ---------------------------------------------------------------------------- prompts and padding
def test_prompt_truncation_and_left_padding_whatever_the_tokenizer_side():
    tok = char_tokenizer()
    tok.padding_side = "right"
    ids = encode_prompts(tok, ["abcdef", "ab"], max_length=4, truncation="left")
    assert ids == [tok("cdef")["input_ids"], tok("ab")["input_ids"]]
    assert encode_prompts(tok, ["abcdef"], 4, "right") == [tok("abcd")["input_ids"]]
    with pytest.raises(ValueError, match=r"prompts\[0\] has 6 tokens > max_prompt_length=4"):
        encode_prompts(tok, ["abcdef"], 4, "error")
    with pytest.raises(ValueError, match=r"prompts\[1\] encodes to no tokens"):
        encode_prompts(tok, ["a", ""], 4)
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        encode_prompts(tok, [3], 4)
    x, m = left_pad(ids, pad_id=0)
    assert x.tolist() == [ids[0], [0, 0] + ids[1]] and m.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_tokenizer_without_pad_token_pads_with_eos():
    tok = char_tokenizer(pad=False)
    assert special_ids(tok) == (2, 2)
    assert special_ids(char_tokenizer()) == (2, 0)


def test_completion_mask_runs_through_first_eos():
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, has_eos = completion_mask(resp, 2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_reward_model_scores_read_the_last_real_token():
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(cfg).eval()
    ids = torch.tensor([[0, 0, 1, 5, 6, 2], [1, 7, 8, 9, 10, 2]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    got = reward_model_scores(rm, ids, mask)
    for b, start in enumerate([2, 0]):  # each row alone, unpadded
        alone = rm(input_ids=ids[b : b + 1, start:]).logits[0, 0]
        torch.testing.assert_close(got[b], alone, rtol=1e-5, atol=1e-5)
    # a trunk with a scalar head: a PolicyValueModel's value head at the last real token
    pv = seeded_model().eval()
    torch.nn.init.normal_(pv.value_head.weight)
    ext_ids, ext_mask = torch.cat([ids, ids[:, :1]], 1), torch.cat([mask, mask[:, -1:]], 1)
    # forward's values at column 0 come from the state at position 5 = the last real token
    torch.testing.assert_close(pv.score_sequences(ids, mask), pv(ext_ids, ext_mask, 6)[1][:, 0])


# ---------------------------------------------------------------------------- loss normalisation
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_micro_batch_scales_reproduce_the_mini_batch_loss(loss_agg):
    """sum(scale * loss(micro)) == loss(mini) even though micro-batches trim padding columns."""
    from rlhf_fast.trainer.base import RLTrainer

    g = torch.Generator().manual_seed(0)
    B, P, R, V = 6, 3, 5, 11
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])
    mask = torch.arange(R) < lengths[:, None]
    ids = torch.randint(0, V, (B, P + R), generator=g)
    batch = Rollout([""] * B, [""] * B, ids, torch.ones_like(ids), P, mask, torch.zeros(B), mask.any(-1),
                    logprobs=-torch.rand(B, R, generator=g), advantages=torch.randn(B, R, generator=g))
    logits = torch.randn(B, R, V, generator=g, dtype=torch.float64)

    class Stub:
        config = PPOConfig(loss_agg=loss_agg, rollout_batch_size=6, mini_batch_size=6, micro_batch_size=2)

    mini = torch.tensor([4, 0, 3, 5, 1, 2])
    kw = dict(loss_agg=loss_agg, max_tokens=R)
    total = 0.0
    parts = mini.split(2)
    for part, (mb, scale) in zip(parts, RLTrainer.micro_batches(Stub(), batch, mini), strict=True):
        lg = logits[part, : mb.response_mask.shape[1]]
        assert mb.response_mask.shape[1] == max(int(lengths[part].max()), 1)  # padding columns trimmed
        total = total + scale * ppo_policy_loss_ref(lg, mb.responses, mb.logprobs, mb.advantages,
                                                    mb.response_mask, **kw)[0]
    full = ppo_policy_loss_ref(logits[mini], ids[mini, P:], batch.logprobs[mini], batch.advantages[mini],
                               mask[mini], **kw)[0]
    torch.testing.assert_close(total, full, rtol=1e-6, atol=1e-9)  # scales are fp32


# ---------------------------------------------------------------------------- logged statistics
def test_reward_mean_does_not_overflow_near_the_fp32_limit(tmp_path):
    """Scores near -3e38 (finite fp32) have a finite mean: the metric sums in float64."""
    from rl_utils import PROMPTS, target_fraction

    from rlhf_fast import GRPOTrainer

    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), rollout_batch_size=2, group_size=2, mini_batch_size=4,
                                micro_batch_size=4,
                                max_new_tokens=4, progress_bar=False, tensorboard=False, plot=False, device="cpu"),
                     model=seeded_model(value_head=False), tokenizer=char_tokenizer(), reward_fn=target_fraction,
                     prompts=PROMPTS)
    batch = tr.sample(0, repeat=2)
    batch.scores = torch.tensor([-3e38, -3e38, -2e38, -3e38])
    out = tr.rollout_metrics(batch, 0.0, 0.0)
    assert out["reward/mean"] == pytest.approx(-2.75e38, rel=1e-7)
    assert math.isfinite(out["reward/std"])


@pytest.mark.parametrize("values_shift, want", [(0.0, 1.0), (2.5, 1.0), (None, 0.0)])
def test_explained_variance_of_constant_returns_follows_value_loss(values_shift, want):
    """Var[returns] = 0: 1 when the values track the returns up to a constant, else 0 (value_loss's
    definition), never NaN; the logged metric and the op's stat agree."""
    from rlhf_fast.ops import value_loss
    from rlhf_fast.trainer.ppo import explained_variance

    returns = torch.full((3, 4), 0.7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    values = returns + values_shift if values_shift is not None else torch.randn(3, 4)
    assert explained_variance(values, returns, mask) == want
    _, stats = value_loss(values, values.clone(), returns, mask)
    assert float(stats["explained_variance"]) == want
