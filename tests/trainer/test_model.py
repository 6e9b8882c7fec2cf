"""PolicyValueModel: response-only logits, values, separate critic, save/load round trip, and
the sampler's distribution equal to the one the loss recomputes."""
import pytest
import torch
from rl_utils import seeded_model, tiny_config
from transformers import AutoModel, AutoModelForCausalLM

from rlhf_fast import PolicyValueModel, token_logprobs
from rlhf_fast.trainer.model import position_ids_from_mask, response_logits
from rlhf_fast.trainer.rollout import completion_mask, left_pad, sample_completions


def _batch(vocab=19, P=5, R=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, P + R), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[1, -1] = 0  # a hole after EOS
    ids[mask == 0] = 0
    return ids, mask, P


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_response_logits_match_full_forward_and_skip_prompt_positions(kind):
    model = _random_value_head(seeded_model(kind).eval())
    ids, mask, P = _batch()
    seen = []
    hook = model.policy.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    logits, values = model(ids, mask, P)
    hook.remove()
    assert seen == [torch.Size([3, ids.shape[1] - P, 32])]  # the LM head saw response positions only
    full = model.policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(logits, full[:, P - 1 : -1], rtol=1e-5, atol=1e-5)
    assert values.shape == (3, ids.shape[1] - P) and values.dtype == torch.float32
    hidden = model.policy.base_model(input_ids=ids, attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask)).last_hidden_state
    torch.testing.assert_close(values, model.value_head(hidden[:, P - 1 : -1]).squeeze(-1))
    torch.testing.assert_close(response_logits(model.policy, ids, mask, P), logits)


def test_sampling_distribution_equals_recomputed_logprobs():
    """generate's processed scores at temperature T == token_logprobs(response logits, T), left padding included."""
    model = seeded_model().eval()
    ids, mask = left_pad([[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]], pad_id=0)
    T = 0.7
    torch.manual_seed(1)
    out = model.policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=T, top_k=0,
                                top_p=1.0, max_new_tokens=6, eos_token_id=2, pad_token_id=0, output_scores=True,
                                return_dict_in_generate=True)
    torch.manual_seed(1)
    resp = sample_completions(model.policy, ids, mask, max_new_tokens=6, temperature=T, eos_id=2, pad_id=0)
    assert torch.equal(resp, out.sequences[:, ids.shape[1]:])  # our sampler draws the same tokens
    sampled = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, resp[..., None])[..., 0]
    rmask, _ = completion_mask(resp, 2)
    full_mask = torch.cat([mask, rmask.long()], 1)
    logits, _ = model(torch.cat([ids, resp], 1), full_mask, ids.shape[1])
    lp = token_logprobs(logits, resp, temperature=T)
    torch.testing.assert_close(lp[rmask], sampled[rmask], rtol=0, atol=1e-5)


def test_model_generation_config_does_not_leak_into_sampling():
    model = seeded_model().eval()
    model.policy.generation_config.top_k = 1  # greedy-like if it leaked
    model.policy.generation_config.repetition_penalty = 5.0
    ids, mask = left_pad([[1, 5, 6]] * 8, pad_id=0)
    torch.manual_seed(0)
    resp = sample_completions(model.policy, ids, mask, max_new_tokens=5, temperature=1.0, eos_id=2, pad_id=0)
    assert len({tuple(r.tolist()) for r in resp}) > 1  # identical prompts, different samples
    assert model.policy.generation_config.top_k == 1  # restored


@pytest.mark.parametrize("separate", [False, True])
def test_save_pretrained_round_trip(tmp_path, separate):
    model = _random_value_head(seeded_model(separate_critic=separate))
    with torch.no_grad():
        if separate:
            next(model.critic.parameters()).add_(0.1)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "value_head.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)  # the policy is a plain HF checkpoint
    for (n, a), b in zip(model.policy.state_dict().items(), hf.state_dict().values()):
        assert torch.equal(a, b), n
    loaded = PolicyValueModel.from_pretrained(tmp_path)
    assert (loaded.critic is not None) == separate
    if separate:
        AutoModel.from_pretrained(tmp_path / "critic")
    ids, mask, P = _batch()
    model.eval(), loaded.eval()
    (l1, v1), (l2, v2) = model(ids, mask, P), loaded(ids, mask, P)
    assert torch.equal(l1, l2) and torch.equal(v1, v2)
    # load_weights restores in place (what checkpoints use)
    fresh = seeded_model(seed=5, separate_critic=separate).eval()
    fresh.load_weights(tmp_path)
    assert torch.equal(fresh(ids, mask, P)[1], v1)
    with pytest.raises(ValueError, match="separate_critic"):
        seeded_model(separate_critic=not separate).load_weights(tmp_path)


def _random_value_head(model):
    with torch.no_grad():
        model.value_head.weight.normal_()
        model.value_head.bias.fill_(0.25)
    return model


def test_separate_critic_owns_the_values():
    model = _random_value_head(seeded_model(separate_critic=True).eval())
    ids, mask, P = _batch()
    logits, values = model(ids, mask, P)
    with torch.no_grad():
        for p in model.critic.parameters():
            p.mul_(1.5)
    logits2, values2 = model(ids, mask, P)
    assert torch.equal(logits, logits2) and not torch.allclose(values, values2)
    assert not any(p is q for p in model.critic.parameters() for q in model.policy.parameters())


def test_from_pretrained_of_a_plain_causal_lm_adds_a_fresh_value_head(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(tmp_path)
    model = PolicyValueModel.from_pretrained(tmp_path)
    assert model.value_head is not None and model.critic is None
    bare = PolicyValueModel.from_pretrained(tmp_path, value_head=False)
    ids, mask, P = _batch()
    with pytest.raises(ValueError, match="no value head"):
        bare(ids, mask, P)
    logits, values = bare(ids, mask, P, with_values=False)
    assert values is None


def test_bad_arguments_are_named():
    model = seeded_model()
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="response_start"):
        model(ids, mask, 0)
    with pytest.raises(ValueError, match="critic"):
        PolicyValueModel(model.policy, critic=model.policy.base_model)
    with pytest.raises(TypeError, match="base_model"):
        PolicyValueModel(torch.nn.Linear(2, 2))
