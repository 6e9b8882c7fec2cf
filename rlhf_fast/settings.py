"""A stage's settings: one flat mapping of the fields of its config dataclass (SFTConfig,
RewardConfig, PPOConfig, GRPOConfig, DemoConfig) plus the stage's run keys (RUN_KEYS: model,
data files, ...), read from a YAML file, then each ``--set key=value`` (parsed by the field's
type), then ``--model``. An unknown key is an error that lists the valid ones.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

RUN_KEYS = {
    "sft": {"model": "local HF causal-LM folder, or 'tiny' (a fresh tiny Llama + byte tokenizer)",
            "tokenizer": "tokenizer folder (default: the model's)",
            "train_file": "{prompt, response} or {messages} rows: JSONL, parquet or a datasets folder (required)",
            "eval_file": "{prompt, response} or {messages} rows (JSONL, parquet or a datasets folder)"},
    "rm": {"model": "causal-LM folder (e.g. the SFT checkpoint; gets a fresh scalar head), a reward-model "
                    "folder, or 'tiny'",
           "tokenizer": "tokenizer folder (default: the model's)",
           "train_file": "{prompt, chosen, rejected} rows (strings or messages): JSONL, parquet or a datasets "
                         "folder (required)",
           "eval_file": "{prompt, chosen, rejected} rows (JSONL, parquet or a datasets folder)"},
    "ppo": {"model": "policy: causal-LM folder (e.g. the SFT checkpoint) or 'tiny'",
            "tokenizer": "tokenizer folder (default: the model's)",
            "ref_model": "frozen reference folder (default: a copy of the initial policy)",
            "reward_model": "reward-model folder (from `rlhf-fast rm`)",
            "reward_fn": "instead of reward_model: 'package.module:function' (comma-separated or a YAML list for "
                         "several, weighted by reward_weights), called as f(prompts, completions, **columns)",
            "prompts_file": "{prompt, **columns} rows: JSONL, parquet or a datasets folder (required)",
            "reward_judge": "instead of reward_model: a causal-LM folder used as an RLAIF judge (log p(verdict))",
            "judge_template": "the judge's rubric with {prompt} and {completion} (default: a yes/no question)",
            "judge_verdict": "the verdict text scored (default ' Yes')",
            "judge_contrast": "subtracted verdict (default ' No'; 'none' for log p(verdict) alone)",
            "gold_fn": "optional 'package.module:function' gold reward, logged (reward/gold, proxy minus gold)",
            "eval_prompts_file": "optional JSONL of {prompt}: held-out prompts scored every eval_steps"},
    "dpo": {"model": "policy: causal-LM folder (e.g. the SFT checkpoint) or 'tiny'",
            "tokenizer": "tokenizer folder (default: the model's)",
            "ref_model": "frozen reference folder (default: a copy of the initial policy)",
            "train_file": "{prompt, chosen, rejected} rows (strings or messages): JSONL, parquet or a datasets "
                          "folder (required)",
            "eval_file": "{prompt, chosen, rejected} rows (JSONL, parquet or a datasets folder)"},
    "label-pairs": {"model": "the judge: a causal-LM folder (or 'tiny')",
                    "tokenizer": "tokenizer folder (default: the model's)",
                    "pairs_file": "JSONL of {prompt, response_a, response_b} (required)"},
}
RUN_KEYS["grpo"] = RUN_KEYS["rloo"] = RUN_KEYS["ppo"]
RUN_KEYS["best-of-n"] = {k: v for k, v in RUN_KEYS["ppo"].items() if k not in ("ref_model", "eval_prompts_file")}
RUN_KEYS["best-of-n"]["gold_fn"] = "optional 'package.module:function': gold reward of the kept samples, reported"
REQUIRED = {"sft": ("model", "train_file"), "rm": ("model", "train_file"), "ppo": ("model", "prompts_file"),
            "grpo": ("model", "prompts_file"), "rloo": ("model", "prompts_file"), "dpo": ("model", "train_file"),
            "best-of-n": ("model", "prompts_file"), "label-pairs": ("model", "pairs_file")}


class CLIError(Exception):
    """A bad command line, config file or data file: printed as ``rlhf-fast <cmd>: error: ...``."""


# ---------------------------------------------------------------------------- settings
def config_class(command: str):
    if command == "sft":
        from rlhf_fast.trainer.sft import SFTConfig as cls
    elif command == "rm":
        from rlhf_fast.trainer.reward import RewardConfig as cls
    elif command == "ppo":
        from rlhf_fast.trainer.config import PPOConfig as cls
    elif command == "grpo":
        from rlhf_fast.trainer.config import GRPOConfig as cls
    elif command == "rloo":
        from rlhf_fast.trainer.rloo import RLOOConfig as cls
    elif command == "dpo":
        from rlhf_fast.trainer.dpo import DPOConfig as cls
    elif command == "best-of-n":
        from rlhf_fast.trainer.best_of_n import BestOfNConfig as cls
    elif command == "label-pairs":
        from rlhf_fast.trainer.judge import JudgeConfig as cls
    elif command == "demo":
        from rlhf_fast.demo import DemoConfig as cls
    else:
        raise CLIError(f"unknown command {command!r}")
    return cls


def valid_keys(command: str) -> dict:
    """key -> type hint (run keys are str)."""
    cls = config_class(command)
    hints = typing.get_type_hints(cls)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    keys.update({k: str for k in RUN_KEYS.get(command, {})})
    return keys


def unknown_key(command, key, where):
    keys = valid_keys(command)
    return CLIError(f"unknown key {key!r} in {where}; valid keys for `{command}`: {', '.join(sorted(keys))}")


def parse_value(key: str, text: str, hint):
    """``--set key=text`` -> a value of the field's type (bool: true/false/1/0/yes/no/on/off;
    an optional field takes none/null)."""
    allowed = typing.get_args(hint) or (hint,)
    if type(None) in allowed and text.strip().lower() in ("none", "null", "~"):
        return None
    for t in allowed:
        if t is type(None):
            continue
        if t is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            continue
        try:
            return t(text)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise CLIError(f"--set {key}={text}: expected {names}")


def read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise CLIError(f"{path}:{line}: not UTF-8 text (save the file as UTF-8)") from None
    except yaml.YAMLError as e:
        raise CLIError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def resolve_settings(command: str, config_path=None, sets=(), model=None) -> tuple[object, dict]:
    """(config dataclass, run keys) from a YAML file, ``--set`` overrides and ``--model``."""
    keys = valid_keys(command)
    settings = {}
    if config_path:
        for k, v in read_yaml(config_path).items():
            if k not in keys:
                raise unknown_key(command, k, str(config_path))
            settings[k] = v
    for item in sets:
        if "=" not in item:
            raise CLIError(f"--set {item!r}: expected key=value")
        k, text = item.split("=", 1)
        k = k.strip()
        if k not in keys:
            raise unknown_key(command, k, "--set")
        settings[k] = parse_value(k, text, keys[k])
    if model is not None:
        if "model" not in keys:
            raise CLIError(f"--model is not an option of `{command}`")
        settings["model"] = model
    run = {k: settings.pop(k) for k in list(settings) if k in RUN_KEYS.get(command, {})}
    for k, v in run.items():
        if k == "reward_fn" and isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            continue  # several reward functions (a YAML list)
        if v is not None and not isinstance(v, str):
            raise CLIError(f"{k} must be a string (a path), got {v!r}")
    for k in REQUIRED.get(command, ()):
        if not run.get(k):
            hint = " (or --model PATH)" if k == "model" else ""
            raise CLIError(f"`{command}` needs {k}{hint}: {RUN_KEYS[command][k]}")
    from rlhf_fast.trainer.config import ConfigError

    try:
        cfg = config_class(command)(**settings)
    except ConfigError as e:
        raise CLIError(str(e)) from None
    except TypeError as e:
        raise CLIError(f"bad settings for `{command}`: {e}") from None
    return cfg, run


def list_keys(command) -> str:
    keys = valid_keys(command)
    cls = config_class(command)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    lines = [f"settings of `{command}` ({cls.__name__} fields and run keys):"]
    for k in sorted(keys):
        desc = RUN_KEYS.get(command, {}).get(k)
        lines.append(f"  {k} = {defaults[k]!r}" if desc is None else f"  {k}: {desc}")
    return "\n".join(lines)
