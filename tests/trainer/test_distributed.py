"""Distribution on CPU: 2 gloo ranks under torchrun (tests/trainer/dist_worker.py) against one process.

- one PPO / GRPO update on a fixed global batch (FSDP2 and DDP, every loss_agg, reference
  sharded and replicated) gives the parameters, advantages, stats and metrics of one process;
- GRPO groups stay on the rank that owns the prompt, and the ranks' prompts are the step's;
- a 1-process checkpoint resumes on 2 ranks, a 2-rank checkpoint on 1; the export is a plain
  HF checkpoint; only rank 0 writes metrics;
- a rank that raises makes the job exit non-zero, its traceback shown, without hanging;
- ``torchrun -m rlhf_fast ppo --config cfg.yaml`` (skipped while the CLI is absent).
Plus the world-size-free parts in one process: stratified mini-batches, config checks, global
moments / whitening, state-dict checkpoint writing.
"""
from pathlib import Path

import dist_worker as W
import pytest
import torch
from launch import assert_same_figures, assert_same_params, run_job
from launch import torchrun as _torchrun
from rl_utils import seeded_model
from transformers import AutoModelForCausalLM

from rlhf_fast import GRPOConfig, PPOConfig, masked_whiten, masked_whiten_ref
from rlhf_fast.trainer import checkpoint as ckpt
from rlhf_fast.trainer import distributed, hf_io
from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.metrics import read_jsonl
from rlhf_fast.trainer.minibatch import mini_batch_indices

ROOT = Path(__file__).resolve().parents[2]


WORKER = ("tests/trainer/dist_worker.py",)


def torchrun(*args, timeout: float, target=WORKER):
    return _torchrun(*args, timeout=timeout, target=target)


RESUME_KW = dict(rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2, ppo_epochs=1)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs the 2-rank job once: equivalence cases, GRPO sampling, a 1-process checkpoint
    resumed on 2 ranks for one more step (checkpoint + export)."""
    out = tmp_path_factory.mktemp("dist")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        W.trainer("ppo", out / "one", total_steps=1, save_steps=1, **RESUME_KW).train()
    finally:
        torch.set_num_threads(before)
    run_job("main", out / "dist", out / "one" / "checkpoints" / "step-000001", timeout=300, target=WORKER)
    return out, torch.load(out / "dist" / "equivalence.pt", weights_only=False)


@pytest.mark.parametrize("case", list(W.CASES))
def test_one_update_on_two_ranks_equals_one_process(job, tmp_path, case):
    _, results = job
    got = results[case]
    _, want = W.run_case(case, tmp_path)
    torch.testing.assert_close(torch.cat(got["advantages"]), torch.cat(want["advantages"]), rtol=1e-5, atol=1e-6)
    assert_same_params(got["params"], want["params"])
    algo, kw = W.CASES[case]
    init = seeded_model(value_head=algo == "ppo", separate_critic=kw.get("separate_critic", False)).state_dict()
    assert sum(not torch.equal(p, init[k]) for k, p in want["params"].items()) > 10  # the update moved the model
    for kind in ("stats", "metrics"):
        assert_same_figures(got[kind], want[kind], kind)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_sft_style_loss_through_call_through(job, tmp_path, strategy):
    """A loss from a model's parts (trunk + LM head, as SFT computes it) trains the same on 2
    ranks as in one process when called through CallThrough; the export is the HF model."""
    out, results = job
    want = W.sft_step(strategy, tmp_path)
    got = results[f"sft_{strategy}"]
    assert_same_params(got, want)
    exported = AutoModelForCausalLM.from_pretrained(out / "dist" / f"sft_{strategy}").state_dict()
    assert all(torch.equal(exported[k], got[k]) for k in exported)


def test_two_rank_checkpoint_resumes_on_one_process(job, tmp_path):
    out, _ = job
    run = out / "dist" / "resumed"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2]  # rank 0 alone logged
    saved = run / "checkpoints" / "step-000002"
    final = AutoModelForCausalLM.from_pretrained(run / "final")  # the 2-rank export is a plain HF checkpoint
    tr = W.trainer("ppo", tmp_path, total_steps=3, save_steps=1, resume_from=str(saved), **RESUME_KW)
    assert tr.step == 2 and tr.world_size == 1
    files = hf_io.read_weights(tr.model, saved / "model")
    for name, p in tr.model.state_dict().items():
        assert torch.equal(p, files[name]), name
    for name, p in final.state_dict().items():
        assert torch.equal(p, files["policy." + name]), name
    opt = torch.load(saved / "optimizer.pt", weights_only=False)["state"]
    assert all(torch.equal(opt[i]["exp_avg"], s["exp_avg"]) for i, s in tr.optimizer.state_dict()["state"].items())
    tr.train()
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-000003"


def test_a_failing_rank_fails_the_job_with_its_traceback(tmp_path):
    code, log, seconds = torchrun("fail", tmp_path, timeout=180)
    assert code != 0
    assert "[rank 1/2] failed" in log and "RuntimeError: reward server unreachable on rank 1" in log, log[-6000:]
    assert seconds < 180


def test_cli_runs_under_torchrun(tmp_path):
    """``torchrun -m rlhf_fast ppo --config cfg.yaml``: the CLI's trainer joins the job by itself."""
    pytest.importorskip("rlhf_fast.cli")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in W.PROMPTS[:8]))
    out = tmp_path / "out"
    (tmp_path / "cfg.yaml").write_text(
        f"model: tiny\nprompts_file: {tmp_path / 'prompts.jsonl'}\nreward_fn: rl_utils:target_fraction\n"
        f"output_dir: {out}\ntotal_steps: 2\nrollout_batch_size: 4\nmini_batch_size: 4\nmicro_batch_size: 2\n"
        "ppo_epochs: 1\nmax_new_tokens: 6\nprogress_bar: false\ntensorboard: false\n")
    code, log, _ = torchrun("ppo", "--config", tmp_path / "cfg.yaml", timeout=240, target=("-m", "rlhf_fast"))
    assert code == 0, log[-6000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-000002"
    AutoModelForCausalLM.from_pretrained(out / "final")


# ---------------------------------------------------------------------------- one process
@pytest.mark.parametrize("n, mini", [(8, 4), (16, 8), (12, 4), (8, 8)])
def test_stratified_mini_batches_do_not_depend_on_the_world_size(n, mini):
    single = mini_batch_indices(n, mini, torch.Generator().manual_seed(5))
    assert sorted(torch.cat(single).tolist()) == list(range(n)) and all(len(m) == mini for m in single)
    for world in (2, 4):
        if mini % world:
            continue
        parts = [mini_batch_indices(n // world, mini, torch.Generator().manual_seed(5), r, world) for r in range(world)]
        for j, m in enumerate(single):
            union = torch.cat([parts[r][j] + r * (n // world) for r in range(world)])
            assert union.tolist() == m.tolist(), (world, j)
    with pytest.raises(ValueError, match="mini_batch_size=3"):
        mini_batch_indices(4, 3, torch.Generator(), 0, 2)


def test_config_world_size_checks_and_new_fields():
    PPOConfig(rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2).check_world_size(2)
    with pytest.raises(ConfigError, match=r"PPOConfig.rollout_batch_size=6: must be divisible by the world size 4"):
        PPOConfig(rollout_batch_size=6, mini_batch_size=6, micro_batch_size=2).check_world_size(4)
    with pytest.raises(ConfigError, match=r"GRPOConfig.micro_batch_size=4: must divide the 2 sequences"):
        GRPOConfig(rollout_batch_size=2, group_size=4, mini_batch_size=4, micro_batch_size=4).check_world_size(2)
    with pytest.raises(ConfigError, match="PPOConfig.distributed_strategy"):
        PPOConfig(distributed_strategy="zero3")
    with pytest.raises(ConfigError, match="GRPOConfig.frozen_model_sharding"):
        GRPOConfig(frozen_model_sharding="offload")
    with pytest.raises(ConfigError, match="PPOConfig.dist_timeout_s"):
        PPOConfig(dist_timeout_s=0)


def test_global_moments_and_whitening_in_one_process_match_the_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3 + 1
    mask = torch.rand(5, 7, generator=g) > 0.4
    n, mean, var = distributed.global_moments(x, mask)
    assert int(n) == int(mask.sum())
    torch.testing.assert_close(mean.float(), x[mask].mean())
    torch.testing.assert_close(var.float(), x[mask].var())
    assert distributed.global_moments(x[:1, :1])[2] == 0  # one element: var 0
    # the trainers whiten the gathered global batch with the op; on one process the gather is the identity
    glob = [distributed.gather_rows(t, distributed.global_max(t.shape[1])) for t in (x, mask)]
    assert glob[0] is x and glob[1] is mask
    torch.testing.assert_close(masked_whiten(*glob), masked_whiten_ref(x, mask), rtol=1e-6, atol=1e-6)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.all_reduce(x) is x


@pytest.mark.parametrize("separate_critic", [False, True])
def test_checkpoint_from_a_state_dict_round_trips(tmp_path, separate_critic):
    """What a sharded run writes (a full state dict, tied embeddings included) reads back."""
    model = seeded_model(separate_critic=separate_critic)
    sd = {k: v + 1 for k, v in model.state_dict().items()}  # distinct from the model's own weights
    hf_io.save_weights(model, tmp_path / "m", state_dict=sd)
    back = hf_io.read_weights(model, tmp_path / "m")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    other = seeded_model(seed=1, separate_critic=separate_critic)
    hf_io.load_weights(other, tmp_path / "m")  # the single-process loader reads it too
    assert all(torch.equal(other.state_dict()[k], sd[k]) for k in sd)
    lin = torch.nn.Linear(3, 2)
    hf_io.save_weights(lin, tmp_path / "lin", state_dict={"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert torch.equal(hf_io.read_weights(lin, tmp_path / "lin")["weight"], torch.ones(2, 3))
