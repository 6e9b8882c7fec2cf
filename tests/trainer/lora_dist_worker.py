"""The per-rank side of tests/trainer/test_distributed_lora.py (2 gloo ranks under torchrun):
    python -m torch.distributed.run --nproc_per_node 2 tests/trainer/lora_dist_worker.py OUT
one LoRA update per case of ``LORA_CASES`` on dist_worker's fixed global batch, the gathered
parameters saved to OUT/lora.pt; then the FSDP2 LoRA run's export (a PEFT adapter)."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before rlhf_fast is imported

import dist_worker as W  # noqa: E402
import torch  # noqa: E402

from rlhf_fast.trainer import distributed  # noqa: E402

LORA = dict(lora_r=2, lora_alpha=4.0, lora_target_modules="q_proj,v_proj,up_proj")
LORA_CASES = {
    "grpo_lora_fsdp": ("grpo", dict(loss_type="grpo", distributed_strategy="fsdp", frozen_model_sharding="shard",
                                    **LORA)),
    "ppo_lora_fsdp": ("ppo", dict(loss_agg="token-mean", distributed_strategy="fsdp", **LORA)),
    "ppo_lora_ddp": ("ppo", dict(loss_agg="token-mean", distributed_strategy="ddp", **LORA)),
}


def main(out):
    with distributed.distributed_run("cpu"):
        results = {}
        for name in LORA_CASES:
            tr, results[name] = W.run_case(name, os.path.join(out, name), LORA_CASES)
            assert tr.ref_model is None  # the reference is the base with adapters off
        tr.export(os.path.join(out, "export"))
        if distributed.rank() == 0:
            torch.save(results, os.path.join(out, "lora.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
