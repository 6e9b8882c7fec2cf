"""DPOTrainer: its loss and gradient against a float64 computation from the full HF forward and
the op's formula, against TRL 1.16's DPO loss on the same log-probs, a seeded toy where
held-out preference accuracy rises, resume == uninterrupted, and config errors."""
import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rl_utils import seeded_model

from rlhf_fast.trainer.config import ConfigError
from rlhf_fast.trainer.dpo import DPOConfig, DPOTrainer

QUIET = dict(progress_bar=False, tensorboard=False, plot=False, device="cpu")
PAIRS = [{"prompt": "hi", "chosen": "aaa", "rejected": "bcd e"}, {"prompt": "the cat", "chosen": "a", "rejected": "bb"},
         {"prompt": "dog", "chosen": "ab a", "rejected": "nnm"}, {"prompt": "big", "chosen": "a a", "rejected": "k"},
         {"prompt": "lemon", "chosen": "aaaa", "rejected": "fgh"}, {"prompt": "mind", "chosen": "ca", "rejected": "ddd"}]


def lm(seed=0):
    return seeded_model(value_head=False, seed=seed).policy


def trainer(tmp_path, tokenizer, data=PAIRS, model=None, **kw):
    cfg = DPOConfig(output_dir=str(tmp_path), **{**dict(batch_size=6, micro_batch_size=3, max_steps=2), **kw}, **QUIET)
    return DPOTrainer(cfg, model=model if model is not None else lm(), tokenizer=tokenizer, train_data=data)


def seq_logps64(model, pair_items, pad_id):
    """Summed response log-probs from the model's full HF forward, log_softmax in float64."""
    out = []
    for e in pair_items:
        ids = torch.tensor([e.ids])
        logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp[max(e.n_prompt, 1) - 1:].sum())
    return torch.stack(out)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("sigmoid_norm", 0.0), ("ipo", 0.0)])
def test_loss_and_grad_match_float64(tmp_path, tokenizer, loss_type, ls):
    torch.manual_seed(0)
    ref = lm(seed=1)  # a reference that differs from the policy, so the log-ratios are not 0
    t = DPOTrainer(DPOConfig(output_dir=str(tmp_path), beta=0.7, loss_type=loss_type, label_smoothing=ls, batch_size=6,
                             micro_batch_size=6, **QUIET), model=lm(), ref_model=ref, tokenizer=tokenizer, train_data=PAIRS)
    items = t.train_set
    loss, st = t.model_loss(t.model, items)
    (loss * 1.3).backward()
    m64 = copy.deepcopy(t.model).double()
    m64.zero_grad()
    with torch.no_grad():
        r64 = ref.double()
        rc, rr = seq_logps64(r64, [p.chosen for p in items], 0), seq_logps64(r64, [p.rejected for p in items], 0)
    pc, pr = seq_logps64(m64, [p.chosen for p in items], 0), seq_logps64(m64, [p.rejected for p in items], 0)
    assert torch.allclose(torch.tensor([p.ref_chosen for p in items], dtype=torch.float64), rc, atol=1e-4)
    h_c, h_r = pc - rc, pr - rr
    if loss_type != "sigmoid":
        n = lambda side: torch.tensor([len(getattr(p, side).ids) - getattr(p, side).n_prompt for p in items],  # noqa: E731
                                      dtype=torch.float64)
        h = h_c / n("chosen") - h_r / n("rejected")
    else:
        h = h_c - h_r
    b = 0.7
    want = ((h - 1 / (2 * b)) ** 2).mean() if loss_type == "ipo" else \
        (-(1 - ls) * F.logsigmoid(b * h) - ls * F.logsigmoid(-b * h)).mean()
    (want * 1.3).backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-4 * max(1.0, abs(float(want)))
    for (name, p), p64 in zip(t.model.named_parameters(), m64.parameters()):
        err = (p.grad.double() - p64.grad).abs().max()
        assert err <= 1e-4 * max(1.0, float(p64.grad.abs().max())), name
    assert abs(float(st["rewards/chosen"]) - float(b * h_c.mean())) < 1e-4
    assert abs(float(st["rewards/margin"]) - float(b * (h_c - h_r).mean())) < 1e-4
    assert float(st["rewards/accuracy"]) == pytest.approx(float((h_c > h_r).double().mean()))


def trl_loss(loss_type, beta, pc_tok, pr_tok, mask_c, mask_r, ref_c, ref_r):
    """TRL 1.16's ``trl.trainer.dpo_trainer.DPOTrainer._compute_loss`` run on given per-token
    log-probs: a stand-in ``self`` whose model returns them (zero outside the completion, as
    TRL's fused head does for label -100), with ``precompute_ref_logps`` on."""
    from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

    B, T = pc_tok.shape
    log_probs = torch.cat([pc_tok * mask_c, pr_tok * mask_r])
    zeros = torch.zeros_like(log_probs)
    out = SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    class FakeModel:
        training = True

        def __call__(self, **kw):
            return out

    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x.reshape(-1),
                          gather=lambda x: x)
    fake = SimpleNamespace(model=FakeModel(), accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
                           _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    cm = torch.cat([mask_c, mask_r]).long()
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), cm], 1)  # (2B, T + 1): shifted by one
    inputs = {"input_ids": torch.ones(2 * B, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * B, T + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = TRLDPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False)
    return loss, fake._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "ipo"])
def test_loss_matches_trl(tmp_path, tokenizer, loss_type):
    pytest.importorskip("trl")
    t = DPOTrainer(DPOConfig(output_dir=str(tmp_path), beta=0.4, loss_type=loss_type, batch_size=6, micro_batch_size=6,
                             **QUIET), model=lm(), ref_model=lm(seed=3), tokenizer=tokenizer, train_data=PAIRS)
    items = t.train_set
    with torch.no_grad():
        loss, st = t.model_loss(t.model, items)
        # per-token log-probs of the same model, laid out as TRL's (B, T) completion tensors
        toks = []
        for side in ("chosen", "rejected"):
            rows = []
            for p in items:
                e = getattr(p, side)
                ids = torch.tensor([e.ids])
                lp = torch.log_softmax(t.model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
                rows.append(lp[max(e.n_prompt, 1) - 1:])
            toks.append(rows)
    T = max(len(r) for rows in toks for r in rows)
    pad = lambda rows: torch.stack([F.pad(r, (0, T - len(r))) for r in rows])  # noqa: E731
    mask = lambda rows: torch.stack([F.pad(torch.ones(len(r)), (0, T - len(r))) for r in rows])  # noqa: E731
    ref_c = torch.tensor([p.ref_chosen for p in items], dtype=torch.float32)
    ref_r = torch.tensor([p.ref_rejected for p in items], dtype=torch.float32)
    want, metrics = trl_loss(loss_type, 0.4, pad(toks[0]), pad(toks[1]), mask(toks[0]), mask(toks[1]), ref_c, ref_r)
    assert abs(float(loss) - float(want)) < 1e-5 * max(1.0, abs(float(want))), (float(loss), float(want))
    assert abs(float(st["rewards/chosen"]) - metrics["rewards/chosen"][0]) < 1e-5
    assert abs(float(st["rewards/margin"]) - metrics["rewards/margins"][0]) < 1e-5
    assert float(st["rewards/accuracy"]) == pytest.approx(metrics["rewards/accuracies"][0])


def toy_pairs(prompts, seed):
    """Chosen: distinct letters in ascending order; rejected: the same letters descending (the
    toy's truth; the same tokens on both sides, so no unigram preference helps)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p in prompts:
        n = int(torch.randint(3, 6, (1,), generator=g))
        letters = sorted("abcdefghijkl"[int(i)] for i in torch.randperm(12, generator=g)[:n])
        rows.append({"prompt": p, "chosen": "".join(letters), "rejected": "".join(reversed(letters))})
    return rows


def test_dpo_raises_heldout_accuracy(tmp_path, tokenizer):
    train = toy_pairs(["hello", "abc", "the cat", "dog", "in the", "big", "fine day", "lemon"] * 4, seed=0)
    held = toy_pairs(["mind", "hi", "cab", "jam", "nice", "ink", "halm", "deck"] * 2, seed=1)
    cfg = DPOConfig(output_dir=str(tmp_path), beta=0.1, batch_size=8, micro_batch_size=8, max_steps=30,
                    learning_rate=3e-3, **QUIET)
    t = DPOTrainer(cfg, model=lm(), tokenizer=tokenizer, train_data=train, eval_data=held)
    before = t.evaluate()
    after = t.train()
    assert after["eval/rewards/accuracy"] >= before["rewards/accuracy"] + 0.3, (before, after)
    assert after["eval/logps/accuracy"] >= before["logps/accuracy"] + 0.3, (before, after)
    assert after["eval/loss"] < math.log(2) - 0.1, after
    assert (tmp_path / "final" / "config.json").is_file() and (tmp_path / "ref_logps.pt").is_file()


def test_resume_matches_uninterrupted(tmp_path, tokenizer):
    full = trainer(tmp_path / "full", tokenizer, max_steps=4, batch_size=2, micro_batch_size=1, learning_rate=1e-3, lr_scheduler="constant")
    full.train()
    part = trainer(tmp_path / "part", tokenizer, max_steps=2, batch_size=2, micro_batch_size=1, learning_rate=1e-3, lr_scheduler="constant")
    part.train()
    # the schedule spans 4 steps in both: resume the 2-step run as a 4-step one
    res = trainer(tmp_path / "part", tokenizer, max_steps=4, batch_size=2, micro_batch_size=1, learning_rate=1e-3, lr_scheduler="constant",
                  resume_from="latest")
    assert res.step == 2
    res.train()
    for (n, a), b in zip(full.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_config_errors(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="loss_type"):
        DPOConfig(loss_type="hinge")
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"train_data\[0\].*rejected"):
        trainer(tmp_path, tokenizer, data=[{"prompt": "a", "chosen": "b"}])


def test_a_pair_with_nothing_to_score_names_max_length(tmp_path, tokenizer):
    """An empty prompt without BOS leaves the first response token unscorable: with max_length=1 nothing is
    left to score, an error naming max_length, not a silent 0 log-prob."""
    pairs = [{"prompt": "", "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="no token to score .* max_length=1"):
        DPOTrainer(DPOConfig(output_dir=str(tmp_path), max_length=1, batch_size=1, micro_batch_size=1, **QUIET),
                   model=lm(), ref_model=lm(seed=1), tokenizer=tokenizer, train_data=pairs)
