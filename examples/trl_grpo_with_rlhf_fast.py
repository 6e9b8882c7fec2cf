"""Train a tiny causal LM with TRL's GRPOTrainer, computing the policy loss with rlhf_fast.GRPOLoss.

No monkey-patching: ``RlhfFastGRPOTrainer`` subclasses ``trl.GRPOTrainer`` and overrides its
loss computation (``_compute_loss``). The model returns logits for the completion positions
(``logits_to_keep``), and ``GRPOLoss`` computes log-probs, the clipped surrogate, the KL to
the reference model and the aggregation in one streaming pass over the vocabulary, with a
gradient that allocates only grad_logits.

Everything is built locally (a character-level tokenizer, a 2-layer Llama from a config), so
the script runs on a CPU in seconds without downloads:

    python examples/trl_grpo_with_rlhf_fast.py --steps 2 --loss-type dr_grpo

Supported TRL options: loss_type in {grpo, bnpo, dapo, dr_grpo}, epsilon / epsilon_high,
beta with use_bias_correction_kl=False, delta, temperature, token-level importance sampling.
Others (entropy masks, vLLM importance-sampling correction, the entropy bonus, ...) raise.
"""
from __future__ import annotations

import argparse
import os
import string
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import rlhf_fast


class RlhfFastGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is ``rlhf_fast.GRPOLoss`` (same math as TRL's for the supported options)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        unsupported = {
            "loss_type": self.loss_type not in rlhf_fast.losses.GRPO_LOSS_TYPES,
            "importance_sampling_level": self.importance_sampling_level != "token",
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "vllm_importance_sampling_correction": self.use_vllm and self.vllm_importance_sampling_correction,
            "use_bias_correction_kl (with beta != 0)": self.beta != 0.0 and a.use_bias_correction_kl,
            "entropy_coef": self._entropy_bonus_enabled,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"RlhfFastGRPOTrainer does not support these GRPOConfig settings: {bad}")
        self.rlhf_fast_loss = rlhf_fast.GRPOLoss(
            self.loss_type, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta, delta=a.delta,
            temperature=self.temperature, max_completion_length=self.max_completion_length,
        )

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        # logits at positions -T-1 .. -2 predict the T completion tokens; [:, :-1] is read in place
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1).logits[:, :-1]
        loss, stats = self.rlhf_fast_loss(logits, completion_ids, inputs.get("old_per_token_logps"),
                                          inputs["advantages"], mask, inputs.get("ref_per_token_logps"))

        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":  # TRL normalises by the generation batch's token count, not this micro-batch's
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accum / self.args.steps_per_generation
            loss = loss * mask.sum() / normalizer
        else:
            loss = loss / accum
        for key, name in (("clip_frac", "clip_ratio/region_mean"), ("kl", "kl"), ("approx_kl", "approx_kl")):
            if key in stats:
                self._metrics[mode][name].append(self.accelerator.gather(stats[key]).mean().item())
        return loss


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory (no download)."""
    chars = string.ascii_lowercase + string.digits + " .,!?"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def count_a_reward(completions, **kwargs):
    """Toy reward: the fraction of 'a' characters in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def build_trainer(steps=2, loss_type="dr_grpo", beta=0.0, num_iterations=1, output_dir=None, seed=0):
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    output_dir = output_dir or tempfile.mkdtemp(prefix="grpo_rlhf_fast_")
    model_dir = os.path.join(output_dir, "tiny_llama")
    LlamaForCausalLM(config).save_pretrained(model_dir)  # a local path, so TRL can load a reference copy (beta > 0)
    dataset = Dataset.from_dict({"prompt": ["say a", "abc ", "hello", "aaa b", "the a", "zz a ", "a, a.", "b c d"]})
    args = GRPOConfig(
        output_dir=output_dir, max_steps=steps, learning_rate=1e-3,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, loss_type=loss_type,
        beta=beta, use_bias_correction_kl=False, num_iterations=num_iterations, epsilon_high=0.28, temperature=1.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=seed, disable_tqdm=True,
    )
    return RlhfFastGRPOTrainer(model=model_dir, reward_funcs=count_a_reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loss-type", default="dr_grpo", choices=sorted(rlhf_fast.losses.GRPO_LOSS_TYPES))
    parser.add_argument("--beta", type=float, default=0.0, help="KL weight (a reference model is kept when > 0)")
    parser.add_argument("--num-iterations", type=int, default=1, help="> 1 reuses rollouts (ratio != 1)")
    a = parser.parse_args()
    trainer = build_trainer(a.steps, a.loss_type, a.beta, a.num_iterations)
    trainer.train()
    for row in trainer.state.log_history:
        if "loss" in row:
            keys = ("step", "loss", "reward", "kl", "approx_kl", "clip_ratio/region_mean")
            print({k: row[k] for k in keys if k in row})


if __name__ == "__main__":
    main()
