"""LoRA under torchrun (2 gloo ranks on CPU): one GRPO / PPO update of the adapters (and the
value head) under FSDP2 and DDP equals one process's; the sharded run exports a PEFT adapter."""
import dist_worker as W
import pytest
import torch
from launch import assert_same_figures, assert_same_params, run_job
from lora_dist_worker import LORA_CASES


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dist")
    run_job(out, timeout=300, target=("tests/trainer/lora_dist_worker.py",))
    return out, torch.load(out / "lora.pt", weights_only=False)


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_update_on_two_ranks_equals_one_process(job, tmp_path, case):
    out, results = job
    got = results[case]
    _, want = W.run_case(case, tmp_path, LORA_CASES)
    assert_same_params(got["params"], want["params"])
    assert any("lora_B" in name and bool(p.abs().sum() > 0) for name, p in want["params"].items())  # B starts at 0
    assert_same_figures(got["stats"], want["stats"], "stats")


def test_sharded_lora_run_exports_a_peft_adapter(job):
    out, _ = job
    assert (out / "export" / "adapter_config.json").is_file()
    assert (out / "export" / "adapter_model.safetensors").is_file()
