"""LoRA through PEFT: the PPO/GRPO reference is the policy's base with adapters disabled (no
second copy of the weights), PPO trains the value head beside the trunk's adapters, the export
is a PEFT adapter that ``PeftModel.from_pretrained`` reloads to the trained policy's log-probs,
and the optional merged export loads in vanilla transformers with no missing keys."""
import json

import pytest
import torch
import transformers as T
from arch_specs import arch_lm
from peft import PeftModel
from rl_utils import PROMPTS, char_tokenizer, target_fraction

from rlhf_fast.ops import token_logprobs
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.grpo import GRPOConfig, GRPOTrainer
from rlhf_fast.trainer.hf_io import is_peft
from rlhf_fast.trainer.lora import parameter_storages
from rlhf_fast.trainer.model import PolicyValueModel, response_logits
from rlhf_fast.trainer.ppo import PPOConfig, PPOTrainer
from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
RL = dict(total_steps=2, rollout_batch_size=2, micro_batch_size=2, max_new_tokens=4, learning_rate=1e-2, **QUIET)
LORA = dict(lora_r=4, lora_alpha=8.0, lora_target_modules="q_proj,v_proj,gate_proj")


def dense_reward(prompts, completions):
    """Never all-zero (a zero reward leaves a fresh value head and LoRA's B = 0 without gradient)."""
    return [0.5 + c.count("a") + 0.1 * len(c) + 0.01 * i for i, c in enumerate(completions)]


def logprobs(lm, ids, mask, P=4):
    with torch.no_grad():
        return token_logprobs(response_logits(lm, ids, mask, P), ids[:, P:])


def ids_mask():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 19, (3, 9), generator=g)
    return ids, torch.ones_like(ids)


def test_grpo_lora_reference_is_the_base_and_adapter_reloads(tmp_path):
    base = arch_lm("llama_untied")
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), group_size=2, mini_batch_size=4, beta=0.1,
                                lora_export_merged=True, **RL, **LORA),
                     model=base, tokenizer=char_tokenizer(), reward_fn=dense_reward, prompts=PROMPTS)
    assert is_peft(tr.model.policy) and tr.ref_model is None
    # memory: the trainer holds the base once plus the adapters (a copied reference would double it)
    base_bytes = sum(p.numel() * p.element_size() for p in arch_lm("llama_untied").parameters())
    held = parameter_storages(tr.model)
    adapters = sum(p.numel() * p.element_size() for p in tr.model.parameters() if p.requires_grad)
    assert held == base_bytes + adapters and adapters < 0.2 * base_bytes
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    tr.train()
    ids, mask = ids_mask()
    pristine = arch_lm("llama_untied")
    trained = logprobs(tr.model.policy, ids, mask)
    assert not torch.allclose(trained, logprobs(pristine, ids, mask))  # the adapters learned
    with tr.model.policy.disable_adapter():  # the reference: exactly the untouched base
        torch.testing.assert_close(logprobs(tr.model.policy, ids, mask), logprobs(pristine, ids, mask), rtol=0, atol=0)

    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(arch_lm("llama_untied"), final).eval()
    torch.testing.assert_close(logprobs(reloaded, ids, mask), trained)
    merged, info = T.AutoModelForCausalLM.from_pretrained(final / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logprobs(merged.eval(), ids, mask), trained, rtol=1e-5, atol=1e-5)


def test_ppo_lora_trains_value_head_and_trunk_adapters(tmp_path):
    tr = PPOTrainer(PPOConfig(output_dir=str(tmp_path), ppo_epochs=1, mini_batch_size=2, **RL, **LORA),
                    model=arch_lm("qwen2"), tokenizer=char_tokenizer(), reward_fn=dense_reward, prompts=PROMPTS)
    assert tr.ref_model is None
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trainable
    assert all("lora_" in n or n.startswith("value_head.") for n in trainable)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if n in trainable}
    tr.train()
    changed = {n for n, p in tr.model.named_parameters() if n in trainable and not torch.equal(before[n], p)}
    assert "value_head.weight" in changed and any("lora_B" in n for n in changed)
    meta = json.loads((tmp_path / "final" / "value_model.json").read_text())
    assert meta["lora"] is True and (tmp_path / "final" / "value_head.safetensors").is_file()


def test_sft_lora_checkpoint_resumes_exactly(tmp_path):
    data = [{"prompt": p, "response": "ab"} for p in PROMPTS]

    def make(out, **kw):
        return SFTTrainer(SFTConfig(output_dir=str(out), batch_size=4, micro_batch_size=4, learning_rate=1e-2,
                                    lr_scheduler="constant",
                                    **QUIET, **LORA, **kw), model=arch_lm("llama_tied"), tokenizer=char_tokenizer(),
                          train_data=data)

    full = make(tmp_path / "a", max_steps=2)
    full.train()
    half = make(tmp_path / "b", max_steps=1)
    half.train()
    resumed = make(tmp_path / "b", max_steps=2, resume_from="latest")
    assert resumed.step == 1
    resumed.train()
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert (tmp_path / "a" / "final" / "adapter_config.json").is_file()


def test_reward_model_lora_keeps_the_score_head_trainable(tmp_path):
    from rlhf_fast.trainer.reward import reward_model_from_pretrained

    arch_lm("llama_tied").save_pretrained(tmp_path / "base")
    rm = reward_model_from_pretrained(tmp_path / "base", pad_token_id=0)
    data = [{"prompt": p, "chosen": "aaa", "rejected": "bcd"} for p in PROMPTS[:8]]
    tr = RewardTrainer(RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, micro_batch_size=4,
                                    **QUIET, **LORA), model=rm, tokenizer=char_tokenizer(), train_data=data)
    trainable = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    tr.train()


def test_peft_config_file_and_errors(tmp_path):
    (tmp_path / "lora.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path / "run"), group_size=2, mini_batch_size=4,
                                peft_config=str(tmp_path / "lora.json"), **RL),
                     model=arch_lm("llama_tied"), tokenizer=char_tokenizer(), reward_fn=target_fraction, prompts=PROMPTS)
    assert tr.model.policy.peft_config["default"].r == 2
    with pytest.raises(ConfigError, match="lora_target_modules"):
        GRPOTrainer(GRPOConfig(output_dir=str(tmp_path / "bad"), group_size=2, mini_batch_size=4, lora_r=2,
                               lora_target_modules="no_such_proj", **RL),
                    model=arch_lm("llama_tied"), tokenizer=char_tokenizer(), reward_fn=target_fraction,
                    prompts=PROMPTS)
    with pytest.raises(ConfigError, match="peft_config"):
        GRPOConfig(peft_config=str(tmp_path / "lora.json"), lora_r=2)
    with pytest.raises(ConfigError, match="lora_dropout"):
        GRPOConfig(lora_dropout=1.5)


def test_a_get_peft_model_policy_is_used_as_given(tmp_path):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(arch_lm("gpt2"), LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), group_size=2, mini_batch_size=4, **RL),
                     model=policy, tokenizer=char_tokenizer(), reward_fn=target_fraction, prompts=PROMPTS)
    assert tr.model.policy is policy and tr.ref_model is None
    tr.train()
    assert isinstance(PolicyValueModel(policy, value_head=False).policy, PeftModel)
