"""The rollout's sampler log-probs (recorded during ``generate``, no extra forward) and the
rollout-mismatch correction fed by them: fp32 sampler == the recomputed log-probs; a bf16
sampler against an fp32 trainer gives a small, measured mismatch the correction reweights."""
import copy

import torch
from rl_utils import seeded_model

from rlhf_fast import ppo_policy_loss, token_logprobs
from rlhf_fast.trainer.rollout import completion_mask, concat_rollouts, left_pad, sample_completions, sample_rollout

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]


def _recomputed(model, ids, mask, resp, T):
    rmask, _ = completion_mask(resp, 2)
    with torch.no_grad():
        logits, _ = model(torch.cat([ids, resp], 1), torch.cat([mask, rmask.long()], 1), ids.shape[1])
    return logits, token_logprobs(logits, resp, temperature=T), rmask


def test_sampler_logprobs_are_the_sampling_distribution():
    model = seeded_model().eval()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    T = 0.7
    torch.manual_seed(1)
    plain = sample_completions(model.policy, ids, mask, max_new_tokens=6, temperature=T, eos_id=2, pad_id=0)
    torch.manual_seed(1)
    resp, lp = sample_completions(model.policy, ids, mask, max_new_tokens=6, temperature=T, eos_id=2, pad_id=0,
                                  with_logprobs=True)
    assert torch.equal(resp, plain)  # recording changes nothing about the draw
    assert lp.shape == resp.shape and lp.dtype == torch.float32
    _, want, rmask = _recomputed(model, ids, mask, resp, T)
    torch.testing.assert_close(lp[rmask], want[rmask], rtol=0, atol=1e-5)
    assert (lp[rmask] < 0).all()


def test_bf16_sampler_vs_fp32_trainer_mismatch_and_correction():
    """The sampler runs a bf16 copy of the policy, the trainer the fp32 policy: the recorded
    log-probs differ from the trainer's by bf16 rounding (measured, > 0, < 0.1 nats), and tis
    reweights the loss by exactly exp(trainer - sampler) (clamped)."""
    model = seeded_model().eval()
    sampler_model = copy.deepcopy(model).to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS * 2, pad_id=0)
    T = 1.0
    torch.manual_seed(3)
    resp, slp = sample_completions(sampler_model.policy, ids, mask, max_new_tokens=8, temperature=T, eos_id=2,
                                   pad_id=0, with_logprobs=True)
    logits, old, rmask = _recomputed(model, ids, mask, resp, T)
    diff = (old - slp)[rmask].abs()
    assert 0 < float(diff.max()) < 0.1, float(diff.max())
    adv = torch.randn(resp.shape[0])
    logits = logits.detach().requires_grad_()
    loss, stats = ppo_policy_loss(logits, resp, old.detach(), adv, rmask, sampler_logprobs=slp, correction="tis",
                                  correction_high=1.01)
    assert abs(float(stats["mismatch_abs_mean"]) - float(diff.mean())) < 1e-6
    assert abs(float(stats["mismatch_abs_max"]) - float(diff.max())) < 1e-6
    w = torch.exp(old.detach() - slp).clamp(max=1.01)
    plain, _ = ppo_policy_loss(logits, resp, old.detach(), adv, rmask)
    # on-policy (old == current): pg = -A per token, so the corrected loss is the token-mean of -A * w
    want = (-(adv[:, None] * w)[rmask]).sum() / rmask.sum()
    assert abs(float(loss.detach()) - float(want)) < 1e-6
    assert abs(float(plain.detach()) - float(-(adv[:, None].expand_as(w))[rmask].mean())) < 1e-6


def test_sample_rollout_records_and_concat_pads(tokenizer):
    model = seeded_model().eval()
    prompts = ["ab", "abcdef"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    parts = []
    for n in (1, 2):
        torch.manual_seed(n)
        parts.append(sample_rollout(model.policy, tokenizer, prompts[:n], ids[:n], max_new_tokens=3 + n,
                                    temperature=1.0, device="cpu", reward_fn=lambda p, c: [0.0] * len(c),
                                    record_logprobs=True))
    both = concat_rollouts(parts, pad_id=0)
    assert len(both) == 3 and both.sampler_logprobs.shape == both.response_mask.shape
    for i, (part, row) in enumerate([(parts[0], 0), (parts[1], 0), (parts[1], 1)]):
        m = part.response_mask[row]
        assert torch.equal(both.responses[i][: m.shape[0]][m], part.responses[row][m])
        assert torch.equal(both.sampler_logprobs[i][: m.shape[0]], part.sampler_logprobs[row])
        prompt = part.input_ids[row, : part.response_start][part.attention_mask[row, : part.response_start] == 1]
        got = both.input_ids[i, : both.response_start][both.attention_mask[i, : both.response_start] == 1]
        assert torch.equal(got, prompt)
    assert not both.response_mask[0, parts[0].response_mask.shape[1]:].any()
