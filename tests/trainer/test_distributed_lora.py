"""LoRA under torchrun (2 gloo ranks on CPU): one GRPO / PPO update of the adapters (and the
value head) under FSDP2 and DDP equals one process's; the sharded run exports a PEFT adapter."""
import dist_worker as W
import pytest
import torch
from launch import torchrun
from lora_dist_worker import LORA_CASES


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dist")
    code, log, _ = torchrun(out, timeout=300, target=("tests/trainer/lora_dist_worker.py",))
    assert code == 0, log[-8000:]
    return out, torch.load(out / "lora.pt", weights_only=False)


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_update_on_two_ranks_equals_one_process(job, tmp_path, case):
    out, results = job
    got = results[case]
    _, want = W.run_case(case, tmp_path)
    assert got["params"].keys() == want["params"].keys()
    moved = 0
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += "lora_B" in name and bool(p.abs().sum() > 0)  # B starts at zero
    assert moved > 0
    for k, v in want["stats"].items():
        assert got["stats"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_sharded_lora_run_exports_a_peft_adapter(job):
    out, _ = job
    assert (out / "export" / "adapter_config.json").is_file()
    assert (out / "export" / "adapter_model.safetensors").is_file()
