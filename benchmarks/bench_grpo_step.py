"""Benchmark: peak memory of one GRPO step, lm_head fused vs materialize vs TRL's GRPOTrainer.

One step = old log-probs of the policy, reference log-probs (beta > 0), advantages, one optimizer
step on the whole batch in one micro-batch (as TRL's per_device_train_batch_size = the batch):
  fused        rlhf_fast GRPOTrainer, lm_head="fused" (log-probs and loss from hidden states)
  materialize  rlhf_fast GRPOTrainer, lm_head="materialize" (the (N, V) response logits, then the ops)
  trl          trl.GRPOTrainer (TRL's own loop, eager logits + selective_log_softmax)
on the same tiny Llama (saved once, loaded by each) and the same batch: P prompts x G completions
of exactly T tokens (fixed token ids, no EOS; generation is replaced by those ids on both sides, so
the figure is the training step's, not HF generate's).

Each provider runs in a fresh process (``--child``) with the RSS high-water method of _common.py:
a warm-up step first (AdamW state and gradients exist afterwards, as in any later step), then the
measured step: ``step_extra`` = peak RSS during it above the RSS before it, ``peak_rss`` = the
process's high-water mark during it. Floors beside them: ``state`` = the bytes of the policy and
reference weights, gradients and AdamW moments (live before the step), and ``logits`` = one fp32
(N, V) tensor, N = P * G * T (what a materialising step must hold at least once).

    python benchmarks/bench_grpo_step.py                 # hidden 256, V = 151936, 8 x 8 x 64, CPU
    python benchmarks/bench_grpo_step.py --quick         # V = 32000, 4 x 4 x 16 (smoke)
    python benchmarks/bench_grpo_step.py --providers fused trl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import env_quick, fixed_mmap_threshold, metadata, print_table, write_json  # noqa: E402

PROVIDERS = ("fused", "materialize", "trl")
STATUS = Path("/proc/self/status")


# ---------------------------------------------------------------------------- RSS high-water
def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", STATUS.read_text()).group(1))


class StepMeter:
    """start(): reset the high-water mark (clear_refs 5) and note the RSS; stop(): the peak."""

    def start(self):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.before = rss_kib("VmRSS")

    def stop(self) -> dict:
        peak = rss_kib("VmHWM")
        return {"rss_before_gib": self.before / 2**20, "peak_rss_gib": peak / 2**20,
                "step_extra_gib": max(peak - self.before, 0) / 2**20}


# ---------------------------------------------------------------------------- the shared model and batch
def prompts(n: int) -> list[str]:
    return [f"prompt {i}: say something" for i in range(n)]


def completion_ids(rows: int, tokens: int) -> list[list[int]]:
    """Fixed completion ids (byte tokens of 'a'..'z', never EOS / pad), row r for the r-th sequence."""
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randint(3 + ord("a"), 3 + ord("z") + 1, (rows, tokens), generator=g)).tolist()


def save_model(path: Path, a) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_fast.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def state_bytes(model) -> int:
    """Policy weights + grads + two AdamW moments, and the reference's weights (fp32)."""
    n = sum(p.numel() for p in model.parameters())
    return n * 4 * (4 + 1)


# ---------------------------------------------------------------------------- providers (child side)
def run_ours(model_dir: Path, lm_head: str, a) -> dict:
    import torch
    from transformers import AutoTokenizer

    from rlhf_fast import GRPOConfig, GRPOTrainer, PolicyValueModel
    from rlhf_fast.trainer.rollout import Rollout, encode_prompts, left_pad

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PolicyValueModel.from_pretrained(model_dir, value_head=False)
    n = a.prompts * a.group
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), device="cpu", total_steps=2, rollout_batch_size=a.prompts,
                     group_size=a.group, mini_batch_size=n, micro_batch_size=n, max_new_tokens=a.tokens, beta=0.04,
                     learning_rate=1e-6, lm_head=lm_head, progress_bar=False, tensorboard=False, plot=False)
    texts = [p for p in prompts(a.prompts) for _ in range(a.group)]
    trainer = GRPOTrainer(cfg, model=model, tokenizer=tok, reward_fn=lambda p, c: [0.0] * len(c), prompts=texts)
    ids, mask = left_pad(encode_prompts(tok, texts, cfg.max_prompt_length), 0)
    resp = torch.tensor(completion_ids(n, a.tokens))
    scores = torch.randn(n, generator=torch.Generator().manual_seed(1))
    base = Rollout(texts, [""] * n, torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1),
                   ids.shape[1], torch.ones_like(resp, dtype=torch.bool), scores, torch.zeros(n, dtype=torch.bool))

    def step(i):
        batch = trainer.make_experience(i, batch=dataclasses.replace(base))
        trainer.compute_advantages(batch)
        trainer.update(batch, i)

    meter = StepMeter()
    step(0)
    meter.start()
    step(1)
    return {**meter.stop(), "state_gib": state_bytes(trainer.model) / 2**30}


def run_trl(model_dir: Path, a) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    n = a.prompts * a.group
    fixed = completion_ids(n, a.tokens)
    meter, out = StepMeter(), {}

    class FixedCompletions(trl.GRPOTrainer):
        """TRL's trainer with generation replaced by the fixed completion ids (row order as sampled)."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            return [list(fixed[i % n]) for i in range(len(prompt_ids))], None

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                meter.start()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                out.update(meter.stop())

    cfg = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n, num_generations=a.group,
                         max_completion_length=a.tokens, max_steps=2, beta=0.04, learning_rate=1e-6, use_cpu=True,
                         report_to="none", logging_steps=1, save_strategy="no", bf16=False,
                         gradient_checkpointing=False, disable_tqdm=True, seed=0, num_iterations=1)
    data = Dataset.from_dict({"prompt": prompts(a.prompts) * 2})
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = FixedCompletions(model=str(model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                               args=cfg, train_dataset=data, processing_class=tok, callbacks=[Meter()])
    trainer.train()
    if not out:
        raise RuntimeError("TRL ran no second step")
    return {**out, "state_gib": state_bytes(trainer.model) / 2**30, "trl": trl.__version__}


def child(a) -> None:
    import torch

    fixed_mmap_threshold()
    torch.set_num_threads(a.threads)
    model_dir = Path(a.model_dir)
    res = run_trl(model_dir, a) if a.child == "trl" else run_ours(model_dir, a.child, a)
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------- parent
def run_child(provider: str, model_dir: Path, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", provider, "--model-dir", str(model_dir),
           "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--layers", str(a.layers), "--prompts",
           str(a.prompts), "--group", str(a.group), "--tokens", str(a.tokens), "--threads", str(a.threads)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        return {"provider": provider, "error": f"exit {p.returncode}: " + " | ".join(tail)}
    return {"provider": provider, **json.loads(lines[-1][len("RESULT "):])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=None, help="default 151936 (--quick: 32000)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=None, help="default 8 (--quick: 4)")
    p.add_argument("--group", type=int, default=None, help="completions per prompt, default 8 (--quick: 4)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per completion, default 64 (--quick: 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (the RSS method)")
    p.add_argument("--quick", action="store_true", default=env_quick())
    p.add_argument("--out", default=None, help="JSON file name under benchmarks/results/")
    p.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.vocab = a.vocab or (32000 if q else 151936)
    a.prompts = a.prompts or (4 if q else 8)
    a.group = a.group or (4 if q else 8)
    a.tokens = a.tokens or (16 if q else 64)
    if a.child:
        return child(a)

    n = a.prompts * a.group * a.tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp), a)
        for prov in a.providers:
            print(f"running {prov} ...", flush=True)
            rows.append(run_child(prov, Path(tmp), a))
    logits_gib = n * a.vocab * 4 / 2**30
    ref = {r["provider"]: r for r in rows if "error" not in r}
    for r in rows:
        r["logits_floor_gib"] = logits_gib
        for other in ("materialize", "trl"):
            if "error" not in r and other in ref and r["provider"] != other:
                r[f"peak_vs_{other}"] = r["peak_rss_gib"] / ref[other]["peak_rss_gib"]
                r[f"extra_vs_{other}"] = r["step_extra_gib"] / ref[other]["step_extra_gib"]
    cols = ["provider", "peak_rss_gib", "step_extra_gib", "state_gib", "logits_floor_gib", "peak_vs_materialize",
            "extra_vs_materialize", "peak_vs_trl", "extra_vs_trl", "error"]
    print(f"\nGRPO step, CPU: hidden {a.hidden}, {a.layers} layers, V = {a.vocab}, {a.prompts} prompts x {a.group} "
          f"completions x {a.tokens} tokens (N = {n}), {a.threads} threads, one process per provider")
    print_table(rows, cols)
    payload = {"benchmark": "grpo_step", "meta": metadata("cpu"),
               "config": {k: getattr(a, k) for k in ("hidden", "vocab", "layers", "prompts", "group", "tokens",
                                                     "threads")},
               "method": "RSS high-water (clear_refs 5) over the second step, fresh process per provider",
               "rows": rows}
    write_json(a.out or ("grpo_step_cpu_quick.json" if q else "grpo_step_cpu.json"), payload)


if __name__ == "__main__":
    main()
