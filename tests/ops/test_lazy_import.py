"""`import rlhf_fast` loads the ops and losses only; the trainer stack loads on first use."""
import subprocess
import sys

import rlhf_fast

TRAINER_NAMES = ["PolicyValueModel", "PPOTrainer", "PPOConfig", "GRPOTrainer", "GRPOConfig", "SFTTrainer", "SFTConfig",
                 "RewardTrainer", "RewardConfig"]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_light():
    out = _run("import sys, rlhf_fast, rlhf_fast.ops, rlhf_fast.losses; "
               "print(sorted(m for m in ('rlhf_fast.trainer', 'transformers') if m in sys.modules))")
    assert out == "[]", f"import rlhf_fast loaded {out}"


def test_trainer_names_load_on_first_access():
    out = _run("import sys, rlhf_fast; t = rlhf_fast.PPOTrainer; "
               "print('rlhf_fast.trainer' in sys.modules, t.__name__, rlhf_fast.SFTConfig.__name__)")
    assert out == "True PPOTrainer SFTConfig"


def test_all_lists_every_name_and_each_resolves():
    assert set(TRAINER_NAMES) <= set(rlhf_fast.__all__)
    for name in rlhf_fast.__all__:
        assert getattr(rlhf_fast, name) is not None
    assert set(TRAINER_NAMES) <= set(dir(rlhf_fast))
    try:
        rlhf_fast.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")
