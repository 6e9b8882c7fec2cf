"""precision / master_weights / frozen_dtype: a bf16 checkpoint trains with fp32 master weights
(an update at lr 1e-6 reaches every trainable tensor; held in bf16 almost none moves), its loss
curve tracks the fp32 run's, fp16 trains through a loss scaler, frozen models may be held in bf16."""
import json

import pytest
import torch
from arch_specs import arch_lm
from rl_utils import PROMPTS, char_tokenizer, target_fraction

from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.grpo import GRPOConfig, GRPOTrainer
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
DATA = [{"prompt": PROMPTS[i % len(PROMPTS)], "response": "ab" * (1 + i % 3)} for i in range(16)]


def sft_run(tmp_path, name, dtype, steps=4, lr=1e-6, **kw):
    model = arch_lm("llama_untied").to(dtype)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    tr = SFTTrainer(SFTConfig(output_dir=str(tmp_path / name), max_steps=steps, batch_size=4, micro_batch_size=4,
                              learning_rate=lr, lr_scheduler="constant", **QUIET, **kw),
                    model=model, tokenizer=char_tokenizer(), train_data=DATA)
    tr.train()
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    moved = {n: not torch.equal(start[n], p.detach().float()) for n, p in tr.model.named_parameters()}
    changed = [(start[n] != p.detach().float()).float().mean() for n, p in tr.model.named_parameters()
               if "embed" not in n and "lm_head" not in n]
    tr.changed_fraction = float(torch.stack(changed).mean())  # of the non-embedding weights' elements
    return tr, losses, moved


def test_bf16_checkpoint_learns_at_lr_1e6_with_fp32_master_weights(tmp_path):
    tr, bf16_losses, moved = sft_run(tmp_path, "bf16", torch.bfloat16, precision="bf16")
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights
    assert all(s["exp_avg"].dtype == torch.float32 for s in tr.optimizer.state.values())
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    assert tr.changed_fraction > 0.95
    _, fp32_losses, _ = sft_run(tmp_path, "fp32", torch.float32, precision="fp32")
    assert len(bf16_losses) == len(fp32_losses) == 4
    for a, b in zip(bf16_losses, fp32_losses):  # bf16 compute: ~3 significant digits
        assert abs(a - b) <= 2e-2 * abs(b), (bf16_losses, fp32_losses)
    # the same run with its weights updated in bf16 loses most updates to rounding
    pure, _, _ = sft_run(tmp_path, "pure", torch.bfloat16, precision="bf16", master_weights="model")
    assert pure.changed_fraction < 0.2, pure.changed_fraction


def test_fp16_trains_through_the_loss_scaler(tmp_path):
    tr, losses, moved = sft_run(tmp_path, "fp16", torch.float32, steps=2, lr=1e-3, precision="fp16")
    assert tr.scaler is not None and tr.scaler.get_scale() > 1
    assert all(torch.isfinite(torch.tensor(losses))) and all(moved.values())


def test_fp16_loss_scale_resumes(tmp_path):
    tr, _, _ = sft_run(tmp_path, "a", torch.float32, steps=1, lr=1e-3, precision="fp16")
    tr.scaler.update(123.0)
    tr.save()
    again = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "a"), max_steps=2, batch_size=4, micro_batch_size=4,
                                 precision="fp16", resume_from="latest", **QUIET),
                       model=arch_lm("llama_untied"), tokenizer=char_tokenizer(), train_data=DATA)
    assert again.step == 1 and again.scaler.get_scale() == 123.0


def test_fp16_overflow_skips_the_step(tmp_path):
    tr, _, _ = sft_run(tmp_path, "skip", torch.float32, steps=1, lr=1e-3, precision="fp16")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    scale = tr.scaler.get_scale()
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    tr.optimizer_step(1, torch.tensor(1.0))  # an overflow of the scaled gradients: no step, no error
    assert tr.scaler.get_scale() < scale
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_frozen_reference_in_bf16(tmp_path):
    tr = GRPOTrainer(GRPOConfig(output_dir=str(tmp_path), total_steps=1, rollout_batch_size=2, group_size=2,
                                mini_batch_size=4, micro_batch_size=2, max_new_tokens=4, frozen_dtype="bf16",
                                precision="bf16", **QUIET),
                     model=arch_lm("llama_untied"), tokenizer=char_tokenizer(), reward_fn=target_fraction,
                     prompts=PROMPTS)
    assert all(p.dtype == torch.bfloat16 for p in tr.ref_model.parameters())
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    tr.train()
    assert (tmp_path / "final" / "config.json").is_file()


@pytest.mark.parametrize("field,value", [("precision", "fp8"), ("master_weights", "bf16"), ("frozen_dtype", "fp16"),
                                         ("model_dtype", "int8"), ("router_aux_loss_coef", -1.0)])
def test_bad_precision_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        SFTConfig(**{field: value})
