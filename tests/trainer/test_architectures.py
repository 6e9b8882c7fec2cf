"""The architecture matrix (issue 13): per family, built from a tiny config (no downloads), the
fused log-probs equal HF's ``log_softmax(model(ids).logits)`` (a float64-bounded tolerance), one
SFT, RM, PPO and GRPO step runs through the public API, and each export reloads in vanilla
transformers with no missing / unexpected keys (all 17 families: ~30 s on one thread)."""
import copy

import pytest
import torch
import transformers as T
from arch_specs import SPECS, arch_config, arch_lm
from rl_utils import PROMPTS, char_tokenizer, target_fraction

from rlhf_fast.ops import linear_token_logprobs, token_logprobs
from rlhf_fast.trainer.grpo import GRPOConfig, GRPOTrainer
from rlhf_fast.trainer.lm_head import logit_transform
from rlhf_fast.trainer.model import (
    PolicyValueModel,
    head_width,
    moe_router,
    position_ids_from_mask,
    resolve_attn_implementation,
    router_aux_loss_coef,
)
from rlhf_fast.trainer.ppo import PPOConfig, PPOTrainer
from rlhf_fast.trainer.reward import RewardConfig, RewardTrainer, reward_model_from_pretrained
from rlhf_fast.trainer.sft import SFTConfig, SFTTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")


def batch(seed=0, B=3, L=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 19, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0  # left padding (shorter than the prompt P = 4)
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def hf_logprobs(lm, ids, mask, P, *, unpadded=False):
    """(B, L - P) log-probs of ``ids[:, P:]`` from HF's logits; ``unpadded``: each row run alone
    without its left padding (HF's float64 eager Gemma2 turns padded rows into NaN)."""
    if unpadded:
        rows = [hf_logprobs(lm, ids[r : r + 1, mask[r].bool()], mask[r : r + 1, mask[r].bool()],
                            P - int((mask[r] == 0).sum())) for r in range(ids.shape[0])]
        return torch.cat(rows)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False).logits
    return torch.log_softmax(logits[:, P - 1 : -1].double(), -1).gather(-1, ids[:, P:, None])[..., 0]


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_logprobs_match_hf_logits(name):
    """Our log-probs == HF's own logits' log-softmax, both ways the trainer computes them: trunk ->
    LM head -> the config's logit transform -> fused op (lm_head="materialize"), and trunk ->
    linear_token_logprobs with the transform passed as logit_scale / softcap (lm_head="fused",
    the default); error <= 2x the fp32 HF error (vs the float64 model) + 1e-5."""
    lm = arch_lm(name, scale=8.0)  # logits of ~10: Gemma2's softcap (3) and the scalings matter
    attn = resolve_attn_implementation("auto", "cpu", lm.config)
    lm.set_attn_implementation(attn)
    ids, mask = batch()
    P = 4
    with torch.no_grad():
        logits, _ = PolicyValueModel(lm, value_head=False)(ids, mask, P, with_values=False)
        ours = token_logprobs(logits, ids[:, P:]).double()
        h = PolicyValueModel(lm, value_head=False)(ids, mask, P, with_values=False, return_hidden=True)[0]
        fused = linear_token_logprobs(h.hidden, h.weight, ids[:, P:], **h.op_kwargs()).double()
        ref32 = hf_logprobs(lm, ids, mask, P)
        lm64 = copy.deepcopy(lm).double()
        if moe_router(lm.config) is not None:
            lm64.set_experts_implementation("eager")  # grouped_mm has no float64
        ref64 = hf_logprobs(lm64, ids, mask, P, unpadded=True)
    valid = mask[:, P:].bool()
    err, err_torch = (ours - ref64)[valid].abs().max(), (ref32 - ref64)[valid].abs().max()
    assert err <= 2 * err_torch + 1e-5, (name, float(err), float(err_torch))
    err_fused = (fused - ref64)[valid].abs().max()
    assert err_fused <= 2 * err_torch + 1e-5, (name, float(err_fused), float(err_torch))


def test_logit_transform_table():
    assert logit_transform(arch_config("granite")) == (1 / 8.0, None)
    assert logit_transform(arch_config("cohere")) == (0.0625, None)
    assert logit_transform(arch_config("gemma2")) == (1.0, 3.0)
    assert logit_transform(arch_config("gemma3")) == (1.0, None)
    assert logit_transform(arch_config("llama_tied")) == (1.0, None)
    assert resolve_attn_implementation("auto", "cpu", arch_config("gemma2")) == "eager"
    assert resolve_attn_implementation("auto", "cpu", arch_config("llama_tied")) == "sdpa"


def test_unknown_head_transform_is_refused_by_name():
    cfg = arch_config("llama_tied")
    cfg.lm_head_multiplier = 0.5  # e.g. a muP head this table does not know
    with pytest.raises(NotImplementedError, match="lm_head_multiplier"):
        logit_transform(cfg)
    cfg.lm_head_multiplier = 1.0  # an identity multiplier is fine
    assert logit_transform(cfg) == (1.0, None)
    cfg = arch_config("granite")
    cfg.logits_scaling = -1.0
    with pytest.raises(ValueError, match="logits_scaling"):
        logit_transform(cfg)


def test_value_head_sized_from_the_trunk_output():
    lm = arch_lm("opt")  # word_embed_proj_dim=16 != hidden_size=32
    assert head_width(lm) == 16
    m = PolicyValueModel(lm)
    ids, mask = batch()
    _, values = m(ids, mask, 4)
    assert m.value_head.in_features == 16 and values.shape == (3, 5)


def test_router_aux_loss_is_hf_aux_loss():
    lm = arch_lm("mixtral")
    assert router_aux_loss_coef(lm) == lm.config.router_aux_loss_coef > 0
    assert router_aux_loss_coef(lm, 0.5) == 0.5
    assert router_aux_loss_coef(arch_lm("llama_tied"), 0.5) == 0.0  # dense: no router
    ids, mask = batch()
    m = PolicyValueModel(lm, value_head=False)
    _, _, aux = m(ids, mask, 4, with_values=False, with_aux=True)
    want = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
              output_router_logits=True, use_cache=False).aux_loss
    torch.testing.assert_close(aux, want.float())
    aux.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lm.named_parameters() if "gate" in n)


def no_missing_keys(cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (cls.__name__, info)
    return model


def sft_data(n=8):
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "response": "a" * (1 + i % 3) + "b"} for i in range(n)]


def pref_data(n=8):
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen": "aaa", "rejected": "bcd"} for i in range(n)]


@pytest.mark.parametrize("name", list(SPECS))
def test_one_step_of_every_stage_and_exports_reload(name, tmp_path):
    tok = char_tokenizer()
    ids, mask = batch()
    # SFT: one step; the export reloads with no missing keys and gives the trained logits
    sft = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=8, micro_batch_size=4,
                               **QUIET), model=arch_lm(name), tokenizer=tok, train_data=sft_data())
    before = {n: p.detach().clone() for n, p in sft.model.named_parameters()}
    sft.train()
    assert any(not torch.equal(before[n], p) for n, p in sft.model.named_parameters())
    reloaded = no_missing_keys(T.AutoModelForCausalLM, tmp_path / "sft" / "final")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids, attention_mask=mask).logits,
                                   sft.model.eval()(ids, attention_mask=mask).logits)

    # RM: a fresh scalar head on the SFT trunk (a sequence-scoring head when the family has no
    # *ForSequenceClassification class); one step; the export reloads
    rm = reward_model_from_pretrained(tmp_path / "sft" / "final", pad_token_id=0)
    has_seqcls = type(rm.config) in T.AutoModelForSequenceClassification._model_mapping
    assert isinstance(rm, PolicyValueModel) != has_seqcls
    RewardTrainer(RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, micro_batch_size=4, **QUIET),
                  model=rm, tokenizer=tok, train_data=pref_data()).train()
    no_missing_keys(T.AutoModelForSequenceClassification if has_seqcls else T.AutoModelForCausalLM,
                    tmp_path / "rm" / "final")
    again = reward_model_from_pretrained(tmp_path / "rm" / "final", pad_token_id=0)
    assert type(again) is type(rm)

    # PPO (value head on the trunk's output width) and GRPO: one step each, exports reload
    kw = dict(total_steps=1, rollout_batch_size=2, mini_batch_size=2, micro_batch_size=2, max_new_tokens=4, **QUIET)
    ppo = PPOTrainer(PPOConfig(output_dir=str(tmp_path / "ppo"), ppo_epochs=1, **kw), model=arch_lm(name),
                     tokenizer=tok, reward_fn=target_fraction, prompts=PROMPTS)
    ppo.train()
    no_missing_keys(T.AutoModelForCausalLM, tmp_path / "ppo" / "final")
    PolicyValueModel.from_pretrained(tmp_path / "ppo" / "final")
    kw["mini_batch_size"] = 4
    GRPOTrainer(GRPOConfig(output_dir=str(tmp_path / "grpo"), group_size=2, **kw), model=arch_lm(name),
                tokenizer=tok, reward_fn=target_fraction, prompts=PROMPTS).train()
    no_missing_keys(T.AutoModelForCausalLM, tmp_path / "grpo" / "final")
    if moe_router(arch_config(name)) is not None:  # the router aux loss is in every stage's loss, logged
        for stage, key in (("sft", "train/router_aux"), ("rm", "train/router_aux"), ("ppo", "loss/router_aux"),
                           ("grpo", "loss/router_aux")):
            assert key in (tmp_path / stage / "metrics.jsonl").read_text(), stage


# ---------------------------------------------------------------------------- model names (hub ids)
def fake_hub_cache(root, repo="org/tiny-gemma2"):
    """A Hugging Face cache holding ``repo`` (a tiny Gemma2 and the char tokenizer), laid out as
    ``huggingface_hub`` writes it."""
    commit = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    arch_lm("gemma2").save_pretrained(snap)
    char_tokenizer().save_pretrained(snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_through_the_local_cache_with_lora_and_dtype(tmp_path, monkeypatch, capsys):
    from rlhf_fast.cli import main
    from rlhf_fast.data import write_jsonl
    from rlhf_fast.models import LoadError, check_model_dir, load_causal_lm, load_kwargs

    snap = fake_hub_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_model_dir("model", "org/tiny-gemma2") == snap
    lm = load_causal_lm("org/tiny-gemma2", None, **load_kwargs(SFTConfig(model_dtype="bf16",
                                                                            attn_implementation="eager")))
    assert lm.dtype == torch.bfloat16 and lm.config._attn_implementation == "eager"
    with pytest.raises(LoadError, match=r"org/absent.*Hugging Face cache .*hub.*HF_HUB_OFFLINE"):
        check_model_dir("model", "org/absent")

    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:4]])
    sets = dict(prompts_file=tmp_path / "prompts.jsonl", reward_fn="rl_utils:target_fraction", total_steps=1,
                rollout_batch_size=2, group_size=2, mini_batch_size=4, micro_batch_size=2, max_new_tokens=3,
                lora_r=2, lora_target_modules="q_proj,v_proj", model_dtype="bf16", precision="bf16",
                output_dir=tmp_path / "grpo", progress_bar=False, tensorboard=False, plot=False, device="cpu")
    argv = ["grpo", "--model", "org/tiny-gemma2"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert (tmp_path / "grpo" / "final" / "adapter_config.json").is_file()
