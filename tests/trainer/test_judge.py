"""The RLAIF judge: its scores equal a direct log_softmax of the full HF forward (one unpadded
text at a time, float64), pairwise labels follow the two-order margin, and bad arguments."""
import pytest
import torch
from rl_utils import seeded_model

from rlhf_fast.trainer.judge import Judge, label_pairs
from rlhf_fast.trainer.rollout import function_scores


def direct_logp(model, tokenizer, text, verdict):
    ids = list(tokenizer(text)["input_ids"])
    v = list(tokenizer(verdict, add_special_tokens=False)["input_ids"])
    x = torch.tensor([ids + v])
    logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
    return sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(v))


@pytest.fixture
def judge_lm():
    return seeded_model(value_head=False, seed=2).policy


@pytest.mark.parametrize("contrast", [None, " n"])
def test_scalar_scores_equal_log_softmax(tokenizer, judge_lm, contrast):
    tpl = "q {prompt} a {completion} ok"
    j = Judge(judge_lm, tokenizer, template=tpl, verdict=" a b", contrast=contrast, batch_size=3)
    prompts = ["hello", "abc", "the cat", "dog", "in the"]
    comps = ["a", "bb ba", "", "nnn", "m"]  # different lengths: left padding in a batch
    got = j.scores(prompts, comps)
    want = [direct_logp(judge_lm, tokenizer, tpl.format(prompt=p, completion=c), " a b") for p, c in zip(prompts, comps)]
    if contrast is not None:
        want = [w - direct_logp(judge_lm, tokenizer, tpl.format(prompt=p, completion=c), contrast)
                for w, p, c in zip(want, prompts, comps)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4), (got, want)
    # usable as a trainer's reward_fn
    assert torch.allclose(function_scores(j, prompts, comps, "cpu"), got)


def test_pairwise_labels(tokenizer, judge_lm):
    j = Judge(judge_lm, tokenizer, pair_template="{prompt}|{a}|{b}:", pair_verdicts=(" a", " b"))
    rows = [{"prompt": "hi", "response_a": "aaa", "response_b": "bcd"},
            {"prompt": "dog", "response_a": "n", "response_b": "a a"}]
    out = label_pairs(j, rows)

    def m(p, x, y):
        t = f"{p}|{x}|{y}:"
        return direct_logp(judge_lm, tokenizer, t, " a") - direct_logp(judge_lm, tokenizer, t, " b")

    for r, o in zip(rows, out):
        margin = (m(r["prompt"], r["response_a"], r["response_b"]) - m(r["prompt"], r["response_b"], r["response_a"])) / 2
        want = (r["response_a"], r["response_b"]) if margin >= 0 else (r["response_b"], r["response_a"])
        assert (o["chosen"], o["rejected"]) == want
        assert o["judge_margin"] == pytest.approx(abs(margin), abs=1e-4)


def test_bad_arguments(tokenizer, judge_lm):
    with pytest.raises(ValueError, match="template"):
        Judge(judge_lm, tokenizer, template="{prompt} {answer}")
    with pytest.raises(ValueError, match="verdict"):
        Judge(judge_lm, tokenizer, verdict="")
    with pytest.raises(ValueError, match="batch_size"):
        Judge(judge_lm, tokenizer, batch_size=0)
    j = Judge(judge_lm, tokenizer)
    with pytest.raises(ValueError, match="identical"):
        label_pairs(j, [{"prompt": "a", "response_a": "b", "response_b": "b"}])
    with pytest.raises(ValueError, match="response_b"):
        label_pairs(j, [{"prompt": "a", "response_a": "b"}])
