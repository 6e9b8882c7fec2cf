"""rlhf_fast.rewards: answer extraction and matching, the column convention, None for no opinion."""
import pytest

from rlhf_fast import rewards


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("3 + 4 = 7, and 7 * 2 = 14", "14"),
        ("the answer is -3.5", "-3.5"),
        ("about 1,000 apples", "1,000"),
        ("no numbers here", None),
        ("unclosed \\boxed{12 and 5", "5"),
    ],
)
def test_extract_answer(text, expected):
    assert rewards.extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, ok",
    [("1,000", "1000", True), ("0.5", "1/2", True), ("7", 7, True), ("7.0", "7", True), ("8", "7", False),
     ("x + 1", "x  +  1", True), ("x+1", "x + 2", False), (None, "3", False), ("$12$", "12", True)],
)
def test_answers_match(pred, gold, ok):
    assert rewards.answers_match(pred, gold) is ok


def test_math_answer_reads_the_answer_column_and_none():
    completions = ["2 + 2 = \\boxed{4}", "it is 5", "I think 9", [{"role": "assistant", "content": "= 12"}]]
    out = rewards.math_answer(["q"] * 4, completions, answer=["4", "6", None, "12"], other=[1, 2, 3, 4])
    assert out == [1.0, 0.0, None, 1.0]


def test_math_answer_errors_name_the_column():
    with pytest.raises(ValueError, match="'answer' column"):
        rewards.math_answer(["q"], ["1"])
    with pytest.raises(ValueError, match="1 completions but 2 answers"):
        rewards.math_answer(["q"], ["1"], answer=["1", "2"])
    with pytest.raises(TypeError, match="string or a list of messages"):
        rewards.math_answer(["q"], [3], answer=["3"])


def test_boxed_format():
    out = rewards.boxed_format(None, ["so \\boxed{3}.", "\\boxed{3} and more text", "\\boxed{1} \\boxed{2}", "3"])
    assert out == [1.0, 0.0, 0.0, 0.0]
