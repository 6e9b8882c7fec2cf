"""The per-rank side of tests/trainer/test_distributed.py, launched by torchrun with 2 gloo ranks:

    python -m torch.distributed.run --nproc_per_node 2 tests/trainer/dist_worker.py main OUT CKPT_1PROC
    python -m torch.distributed.run --nproc_per_node 2 tests/trainer/dist_worker.py fail OUT

``main``: one PPO / GRPO update per CASE on a fixed global batch (each rank scores its
contiguous share of it), results gathered to OUT/equivalence.pt; GRPO groups sampled per rank;
a 1-process checkpoint resumed on 2 ranks, trained one step, checkpointed and exported.
``fail``: rank 1's reward function raises in the first step.

``run_case`` is also what the test runs in one process for the reference.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before rlhf_fast is imported

import torch  # noqa: E402
from rl_utils import PROMPTS, char_tokenizer, seeded_model, target_fraction, tiny_config  # noqa: E402

from rlhf_fast import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer  # noqa: E402
from rlhf_fast.ops.logprobs import token_logprobs  # noqa: E402
from rlhf_fast.trainer import (
    distributed,  # noqa: E402
    hf_io,  # noqa: E402
)
from rlhf_fast.trainer.rollout import Rollout, reward_model_scores  # noqa: E402

QUIET = dict(progress_bar=False, tensorboard=False, plot=False)
# adam_eps=1e-4: Adam turns a gradient entry g into ~ lr * g / (|g| + eps), so with eps=1e-8 an
# entry that is ~0 up to rounding (its sign set by summation order) moves by up to lr; in one
# process merely changing micro_batch_size then moves parameters by 2e-5. With 1e-4 that
# inherent noise is ~2e-7 and the comparison can be tight.
PPO_KW = dict(rollout_batch_size=8, mini_batch_size=4, micro_batch_size=1, ppo_epochs=2, max_new_tokens=6,
              learning_rate=1e-2, adam_eps=1e-4, kl_coef=0.05, vf_coef=0.5, entropy_coef=0.01, seed=0)
GRPO_KW = dict(rollout_batch_size=4, group_size=4, mini_batch_size=8, micro_batch_size=2, num_iterations=2,
               max_new_tokens=6, learning_rate=1e-2, adam_eps=1e-4, beta=0.05, entropy_coef=0.01, seed=0)
# every loss_agg, both strategies, both ways of holding the frozen reference
CASES = {
    "ppo_fsdp": ("ppo", dict(loss_agg="token-mean", distributed_strategy="fsdp", frozen_model_sharding="shard")),
    "ppo_ddp": ("ppo", dict(loss_agg="seq-mean-token-sum", distributed_strategy="ddp",
                            frozen_model_sharding="replicate")),
    "grpo_fsdp": ("grpo", dict(loss_type="grpo", scale="batch", distributed_strategy="fsdp",
                               frozen_model_sharding="shard")),
    "grpo_ddp": ("grpo", dict(loss_type="dr_grpo", scale="batch", distributed_strategy="ddp",
                              frozen_model_sharding="replicate")),
    "grpo_bnpo_fsdp": ("grpo", dict(loss_type="bnpo", scale="group", distributed_strategy="fsdp",
                                    frozen_model_sharding="replicate")),
    "ppo_critic_fsdp": ("ppo", dict(loss_agg="seq-mean-token-mean", distributed_strategy="fsdp",
                                    gradient_checkpointing=True, separate_critic=True)),
}


def trainer(algo, out, separate_critic=False, reward_model=None, **kw):
    scoring = dict(reward_fn=target_fraction) if reward_model is None else dict(reward_model=reward_model)
    if algo == "ppo":
        return PPOTrainer(PPOConfig(output_dir=str(out), **{**QUIET, **PPO_KW, **kw}),
                          model=seeded_model(separate_critic=separate_critic), tokenizer=char_tokenizer(),
                          prompts=PROMPTS, **scoring)
    return GRPOTrainer(GRPOConfig(output_dir=str(out), **{**QUIET, **GRPO_KW, **kw}),
                       model=seeded_model(value_head=False), tokenizer=char_tokenizer(), prompts=PROMPTS, **scoring)


def reward_model():
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config()
    cfg.num_labels = 1
    torch.manual_seed(3)
    return AutoModelForSequenceClassification.from_config(cfg)


def fixed_batch(n_prompts: int, group_size: int = 1, P: int = 5, R: int = 6, V: int = 19) -> Rollout:
    """A sampled-looking global batch: left-padded prompts (a group shares one), completions of
    1..R tokens, some ending in EOS (id 2), padding 0, random scores."""
    g = torch.Generator().manual_seed(123)
    B = n_prompts * group_size
    plen = torch.randint(2, P + 1, (n_prompts,), generator=g).repeat_interleave(group_size)
    pmask = torch.arange(P) >= P - plen[:, None]
    prompt = torch.where(pmask, torch.randint(4, V, (n_prompts, P), generator=g).repeat_interleave(group_size, 0), 0)
    rlen = torch.randint(1, R + 1, (B,), generator=g)
    rmask = torch.arange(R) < rlen[:, None]
    resp = torch.randint(4, V, (B, R), generator=g)
    has_eos = torch.rand(B, generator=g) < 0.5
    resp[torch.arange(B), rlen - 1] = torch.where(has_eos, 2, resp[torch.arange(B), rlen - 1])
    resp = torch.where(rmask, resp, 0)
    ids, attn = torch.cat([prompt, resp], 1), torch.cat([pmask, rmask], 1).long()
    return Rollout([""] * B, [""] * B, ids, attn, P, rmask, torch.randn(B, generator=g), has_eos)


def run_case(name, out, cases=CASES):
    """One update of case ``name`` (of ``cases``) on this rank's share of the fixed global batch.
    Returns, on rank 0: the gathered parameters, the update's stats, the step metrics, the global
    advantages."""
    algo, kw = cases[name]
    tr = trainer(algo, out, **kw)
    cfg = tr.config
    batch = fixed_batch(cfg.rollout_batch_size, getattr(cfg, "group_size", 1))
    n = len(batch) // tr.world_size
    batch = tr.make_experience(0, batch.select(torch.arange(tr.rank * n, (tr.rank + 1) * n), trim=False))
    tr.compute_advantages(batch)
    metrics = tr.rollout_metrics(batch, 0.0, 0.0)
    stats = tr.update(batch, 0)
    params, _ = distributed.full_state_dicts(tr.model)
    adv = [batch.advantages]
    if tr.world_size > 1:
        adv = [None] * tr.world_size
        torch.distributed.all_gather_object(adv, batch.advantages)
    keep = {k: v for k, v in metrics.items() if not k.startswith(("time/", "perf/"))}
    return tr, {"params": params, "stats": stats, "metrics": keep, "advantages": adv}


def sft_nll(lm, ids, attn, sel):
    """Sum of the NLL of the tokens after the positions ``sel`` (B, L-1), from trunk + LM head."""
    from rlhf_fast.trainer.model import lm_trunk, trunk_hidden

    hidden = trunk_hidden(lm_trunk(lm), ids, attn)[:, :-1][sel]
    return -token_logprobs(lm.get_output_embeddings()(hidden), ids[:, 1:][sel]).sum()


def sft_step(strategy, out):
    """One SFT-style AdamW step (token-mean NLL over the global batch) on this rank's rows of a
    fixed batch through CallThrough; returns the gathered weights (rank 0), exports them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config())
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 19, (8, 10), generator=g)
    attn = (torch.arange(10) < torch.randint(5, 11, (8, 1), generator=g)).long()
    sel = (attn[:, 1:] != 0) & (torch.arange(9) >= 3)  # response tokens only
    world, rank = distributed.world_size(), distributed.rank()
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    net, fwd = distributed.prepare_trainable(distributed.CallThrough(lm, sft_nll), strategy, torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, eps=1e-4)
    n = sel[rows].sum().float()
    (fwd(ids[rows], attn[rows], sel[rows]) * world / distributed.all_reduce(n)).backward()
    opt.step()
    distributed.export_pretrained(net.module, os.path.join(out, f"sft_{strategy}"))
    return distributed.full_state_dicts(net.module)[0]


def main(out, ckpt_1proc):
    with distributed.distributed_run("cpu"):  # shutdown: barrier + destroy_process_group
        _main(out, ckpt_1proc)


def _main(out, ckpt_1proc):
    results, trainers = {}, {}
    for name in CASES:  # the first trainer joins the torchrun job
        trainers[name], results[name] = run_case(name, os.path.join(out, name))
    rank = distributed.rank()
    # GRPO: each rank samples whole groups of its contiguous share of the step's prompts
    tr = trainers["grpo_fsdp"]
    G = tr.config.group_size
    local = tr.sample(0, repeat=G).prompts
    every = [None] * tr.world_size
    torch.distributed.all_gather_object(every, local)
    assert all(len(set(p[i : i + G])) == 1 for p in every for i in range(0, len(p), G)), every
    assert sum(every, []) == [tr.prompts[i] for i in tr.prompt_indices(0) for _ in range(G)], every
    assert (rank == 0) == tr.metrics_logger().enabled  # only rank 0 logs
    for strategy in distributed.STRATEGIES:  # an SFT-style loss through CallThrough
        results[f"sft_{strategy}"] = sft_step(strategy, out)
    if rank == 0:
        torch.save(results, os.path.join(out, "equivalence.pt"))
    # a sharded reward model scores what a full copy scores
    tr = trainer("grpo", os.path.join(out, "rm"), reward_model=reward_model(), frozen_model_sharding="shard")
    batch = tr.sample(0, repeat=G)
    torch.testing.assert_close(batch.scores, reward_model_scores(reward_model(), batch.input_ids, batch.attention_mask))

    # a 1-process checkpoint resumes on 2 ranks, trains on, is saved and exported
    tr = trainer("ppo", os.path.join(out, "resumed"), total_steps=2, save_steps=1, resume_from=ckpt_1proc,
                 rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2, ppo_epochs=1, progress_bar=True)
    assert tr.step == 1
    params, optim = distributed.full_state_dicts(tr.model, tr.optimizer)
    if rank == 0:
        files = hf_io.read_weights(tr.model, os.path.join(ckpt_1proc, "model"))
        assert set(files) == set(params) and all(torch.equal(files[k], params[k]) for k in files)
        saved = torch.load(os.path.join(ckpt_1proc, "optimizer.pt"), weights_only=False)
        assert saved["state"].keys() == optim["state"].keys()
        for i, s in saved["state"].items():
            for k, v in s.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(optim["state"][i][k])), (i, k)
    tr.train()


def fail(out):
    def reward(prompts, completions):
        if distributed.rank() == 1:
            raise RuntimeError("reward server unreachable on rank 1")
        return target_fraction(prompts, completions)

    tr = GRPOTrainer(GRPOConfig(output_dir=out, dist_timeout_s=60.0, **{**QUIET, **GRPO_KW}),
                     model=seeded_model(value_head=False), tokenizer=char_tokenizer(), reward_fn=reward, prompts=PROMPTS)
    tr.train()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    {"main": main, "fail": fail}[mode](*args)
