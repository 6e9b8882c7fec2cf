"""``rlhf-fast``: the three RLHF stages, the demo and the benchmarks from one command.

    rlhf-fast demo  [--quick] [--no-kl] [--family] [--out DIR] [--set key=value ...]
    rlhf-fast sft   [--config sft.yaml] [--model PATH] [--set key=value ...]
    rlhf-fast rm    [--config rm.yaml]  [--model PATH] [--set key=value ...]
    rlhf-fast ppo   [--config ppo.yaml] [--model PATH] [--set key=value ...]
    rlhf-fast grpo  [--config grpo.yaml] [--model PATH] [--set key=value ...]
    rlhf-fast rloo  [--config rloo.yaml] [--model PATH] [--set key=value ...]
    rlhf-fast dpo   [--config dpo.yaml] [--model PATH] [--set key=value ...]
    rlhf-fast best-of-n   [--config best_of_n.yaml] [--model PATH] [--set key=value ...]
    rlhf-fast label-pairs [--model JUDGE] [--set pairs_file=PATH] [--set key=value ...]
    rlhf-fast bench [--full] [--only logprobs,kl]

A stage's settings (``settings.py``): the fields of its config dataclass plus its run keys, from
``--config`` YAML, then ``--set key=value``, then ``--model``; models load through ``models.py``.
A user mistake ends with one line ``rlhf-fast <cmd>: error: ...`` and exit status 2 (the
traceback with ``--debug`` or ``RLHF_FAST_DEBUG=1``). ``python -m rlhf_fast`` is the same command.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

from rlhf_fast.cli_errors import check_start, forget_failed_start, save_settings, user_errors
from rlhf_fast.settings import (  # noqa: F401  (parse_value, resolve_settings: the CLI's API too)
    RUN_KEYS,
    CLIError,
    list_keys,
    parse_value,
    read_yaml,
    resolve_settings,
)


# ---------------------------------------------------------------------------- commands
def train_on_files(cfg, run, trainer_class, load_rows, load_model, keys, *, with_ref=False):
    """The supervised commands (sft, rm, dpo): the tokenizer, ``load_rows`` of ``train_file`` (and
    ``eval_file``), ``load_model`` of ``--model`` (with DPO's ``ref_model``: None copies the
    policy), then ``trainer_class(...).train()`` and a line of the result's ``keys``."""
    from rlhf_fast.models import load_causal_lm, load_kwargs, load_tokenizer

    tok = load_tokenizer(run["model"], run.get("tokenizer"), trust_remote_code=cfg.trust_remote_code)
    train = load_rows(run["train_file"])
    evals = load_rows(run["eval_file"]) if run.get("eval_file") else None
    kw = load_kwargs(cfg)
    models = {"model": load_model(run["model"], tok, seed=cfg.seed, **kw)}
    if with_ref:
        models["ref_model"] = (load_causal_lm(run["ref_model"], tok, key="ref_model", seed=cfg.seed, **kw)
                               if run.get("ref_model") else None)
    result = trainer_class(cfg, tokenizer=tok, train_data=train, eval_data=evals, **models).train()
    _report(cfg, result, keys)


def cmd_sft(cfg, run):
    from rlhf_fast.data import load_sft
    from rlhf_fast.models import load_causal_lm
    from rlhf_fast.trainer.sft import SFTTrainer

    train_on_files(cfg, run, SFTTrainer, load_sft, load_causal_lm, ("eval/loss", "train/loss"))


def cmd_rm(cfg, run):
    from rlhf_fast.data import load_preferences
    from rlhf_fast.models import load_reward_model
    from rlhf_fast.trainer.reward import RewardTrainer

    train_on_files(cfg, run, RewardTrainer, load_preferences, load_reward_model,
                   ("eval/accuracy", "eval/loss", "train/accuracy", "train/loss"))


def load_reward(command, cfg, run, tok, **kw) -> dict:
    """{"reward_fn": ...} or {"reward_model": ...} from exactly one of reward_model, reward_fn,
    reward_judge (an RLAIF judge: a causal LM scoring log p(verdict) under a rubric)."""
    from rlhf_fast.models import load_causal_lm, load_reward_fn, load_reward_model, load_tokenizer
    from rlhf_fast.stops import tokenizer_mismatch

    given = [k for k in ("reward_model", "reward_fn", "reward_judge") if run.get(k)]
    if len(given) != 1:
        raise CLIError(f"`{command}` needs exactly one of reward_model (a folder), reward_fn (module:function) and "
                       f"reward_judge (a causal-LM folder){'; got ' + ', '.join(given) if given else ''}")
    if run.get("reward_fn"):  # one, or several (comma-separated or a YAML list) weighted by reward_weights
        specs = run["reward_fn"]
        several = not isinstance(specs, str) or "," in specs or getattr(cfg, "weights", None) is not None
        specs = [s.strip() for s in specs.split(",") if s.strip()] if isinstance(specs, str) else list(specs)
        fns = [load_reward_fn(s) for s in specs]
        return {"reward_fn": fns if several else fns[0]}
    if run.get("reward_model"):
        rm = load_reward_model(run["reward_model"], tok, key="reward_model", seed=cfg.seed, **kw)
        if run["reward_model"] != "tiny":
            why = tokenizer_mismatch(tok, load_tokenizer(run["reward_model"]))
            if why and _rank0():
                warnings.warn(f"reward_model {run['reward_model']} was trained with another tokenizer than the "
                              f"policy's ({why}): its scores of the policy's tokens mean little", stacklevel=1)
        return {"reward_model": rm}
    from rlhf_fast.trainer.judge import SCALAR_TEMPLATE, Judge
    from rlhf_fast.trainer.runtime import resolve_device

    contrast = run.get("judge_contrast", " No")
    lm = load_causal_lm(run["reward_judge"], tok, key="reward_judge", seed=cfg.seed, **kw)
    try:
        judge = Judge(lm.to(resolve_device(cfg.device)), tok, template=run.get("judge_template") or SCALAR_TEMPLATE,
                      verdict=run.get("judge_verdict") or " Yes",
                      contrast=None if str(contrast).lower() in ("none", "") else contrast)
    except ValueError as e:
        raise CLIError(f"reward_judge: {e}") from None
    return {"reward_fn": judge}


def cmd_rl(command, cfg, run):
    from rlhf_fast.data import load_prompt_rows, load_prompts
    from rlhf_fast.encoding import policy_prompt
    from rlhf_fast.models import load_causal_lm, load_kwargs, load_policy, load_reward_fn, load_tokenizer
    from rlhf_fast.trainer.grpo import GRPOTrainer
    from rlhf_fast.trainer.ppo import PPOTrainer
    from rlhf_fast.trainer.rloo import RLOOTrainer

    tok = load_tokenizer(run["model"], run.get("tokenizer"), trust_remote_code=cfg.trust_remote_code)
    kw = load_kwargs(cfg)
    prompts = load_prompt_rows(run["prompts_file"])  # the trainer applies the chat template
    reward = load_reward(command, cfg, run, tok, **kw)
    extra = {}
    if run.get("gold_fn"):
        extra["gold_fn"] = load_reward_fn(run["gold_fn"])
    if run.get("eval_prompts_file"):
        extra["eval_prompts"] = [policy_prompt(tok, p) for p in load_prompts(run["eval_prompts_file"])]
    ref = load_causal_lm(run["ref_model"], tok, key="ref_model", seed=cfg.seed, **kw) if run.get("ref_model") else None
    # --model tiny: the weights come from cfg.seed, so a resumed run rebuilds the same reference
    model = load_policy(run["model"], tok, value_head=command == "ppo", seed=cfg.seed, **kw)
    cls = {"ppo": PPOTrainer, "grpo": GRPOTrainer, "rloo": RLOOTrainer}[command]
    trainer = cls(cfg, model=model, ref_model=ref, tokenizer=tok, prompts=prompts, **reward, **extra)
    trainer.train()
    if _rank0():
        print(f"{command}: done -> {Path(cfg.output_dir) / 'final'} (metrics: {Path(cfg.output_dir) / 'metrics.jsonl'})")


def cmd_dpo(cfg, run):
    from rlhf_fast.data import load_preferences
    from rlhf_fast.models import load_causal_lm
    from rlhf_fast.trainer.dpo import DPOTrainer

    train_on_files(cfg, run, DPOTrainer, load_preferences, load_causal_lm,
                   ("eval/rewards/accuracy", "eval/loss", "train/rewards/accuracy", "train/loss"), with_ref=True)


def cmd_best_of_n(cfg, run):
    from rlhf_fast.data import load_prompts
    from rlhf_fast.encoding import policy_prompt
    from rlhf_fast.models import load_causal_lm, load_reward_fn, load_tokenizer
    from rlhf_fast.trainer.best_of_n import run_best_of_n

    tok = load_tokenizer(run["model"], run.get("tokenizer"))
    raw = load_prompts(run["prompts_file"])
    reward = load_reward("best-of-n", cfg, run, tok)
    gold = load_reward_fn(run["gold_fn"]) if run.get("gold_fn") else None
    policy = load_causal_lm(run["model"], tok, seed=cfg.seed)
    out = run_best_of_n(cfg, policy=policy, tokenizer=tok, prompts=[policy_prompt(tok, p) for p in raw],
                        raw_prompts=raw, gold_fn=gold, **reward)
    if "gold_curve" in out:
        curve = out["gold_curve"]
        print("gold reward of best-of-k (by the reward): " + ", ".join(f"k={k}: {v:.4f}" for k, v in curve.items()))


def cmd_label_pairs(cfg, run):
    from rlhf_fast.data import load_jsonl, write_jsonl
    from rlhf_fast.models import load_causal_lm, load_tokenizer
    from rlhf_fast.trainer.judge import Judge, label_pairs
    from rlhf_fast.trainer.runtime import resolve_device

    path = Path(cfg.output_dir) / "preferences.jsonl"
    if path.exists() and not cfg.overwrite_output_dir:
        raise CLIError(f"{path} exists; set overwrite_output_dir=true to replace it, or choose another output_dir")
    tok = load_tokenizer(run["model"], run.get("tokenizer"))
    rows = load_jsonl(run["pairs_file"], ("prompt", "response_a", "response_b"))
    lm = load_causal_lm(run["model"], tok, seed=cfg.seed).to(resolve_device(cfg.device))
    judge = Judge(lm, tok, pair_template=cfg.pair_template, pair_verdicts=(cfg.verdict_a, cfg.verdict_b),
                  batch_size=cfg.batch_size, max_length=cfg.max_length)
    try:
        labelled = label_pairs(judge, rows)
    except ValueError as e:
        raise CLIError(f"{run['pairs_file']}: {e}") from None
    write_jsonl(path, labelled)
    print(f"label-pairs: {len(labelled)} pairs labelled by the judge -> {path}")


def _report(cfg, result, keys):
    if not _rank0():
        return
    figures = ", ".join(f"{k} {result[k]:.4f}" for k in keys if k in result)
    print(f"done: {figures} -> {Path(cfg.output_dir) / 'final'} (metrics: {Path(cfg.output_dir) / 'metrics.jsonl'})")


def cmd_demo(cfg, run):
    from rlhf_fast.demo import run_demo

    summary = run_demo(cfg)
    bad = [n for n, v in summary["verdicts"].items() if "beats_sft" in v and not v["beats_sft"]]
    return 1 if bad else 0


# ---------------------------------------------------------------------------- bench
def benchmarks_dir(explicit=None) -> Path:
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parent.parent / "benchmarks",
                                                    Path.cwd() / "benchmarks"]
    for c in candidates:
        if c.is_dir() and (c / "run_all.py").is_file():
            return c
    raise CLIError("no benchmarks/run_all.py found (the benchmarks live in the source checkout; pass --dir)")


def cmd_bench(args) -> int:
    """Runs benchmarks/run_all.py of the source checkout (the runner lives beside the benchmarks)."""
    root = benchmarks_dir(args.dir)
    argv = ["--dir", str(root)] + (["--full"] if args.full else []) + (["--only", args.only] if args.only else [])
    return subprocess.call([sys.executable, str(root / "run_all.py"), *argv])


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-fast", description="RLHF: SFT -> reward model -> PPO / GRPO.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def settings_args(sp, with_model=True):
        sp.add_argument("--config", help="YAML file of key: value settings")
        sp.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable)")
        if with_model:
            sp.add_argument("--model", help="local Hugging Face model folder, hub id in the HF cache ('org/model'), or 'tiny'")
        sp.add_argument("--threads", type=int, help="torch CPU threads")
        sp.add_argument("--list-keys", action="store_true", help="print the valid settings and exit")
        sp.add_argument("--debug", action="store_true", help="show the traceback of an error (also RLHF_FAST_DEBUG=1)")

    d = sub.add_parser("demo", help="SFT -> reward model -> PPO and GRPO on a built-in task (no downloads)")
    settings_args(d, with_model=False)
    d.add_argument("--out", help="output folder (output_dir)")
    d.add_argument("--quick", action="store_true", help="a reduced size (about a minute)")
    d.add_argument("--no-kl", action="store_true", help="also run PPO/GRPO without the KL leash (over-optimisation)")
    d.add_argument("--family", action="store_true", help="also best-of-N, DPO, RLOO and RLAIF (the RLHF family)")
    for name, text in (("sft", "supervised fine-tuning on {prompt, response} JSONL"),
                       ("rm", "reward model on {prompt, chosen, rejected} JSONL (Bradley-Terry)"),
                       ("ppo", "PPO against a reward model or reward function"),
                       ("grpo", "GRPO against a reward model or reward function"),
                       ("rloo", "RLOO (leave-one-out REINFORCE, KL in the reward) against a reward"),
                       ("dpo", "DPO on {prompt, chosen, rejected} JSONL (no reward model, no RL)"),
                       ("best-of-n", "sample N per prompt, keep the best by a reward; write SFT / preference data"),
                       ("label-pairs", "an AI judge labels {prompt, response_a, response_b} pairs (RLAIF)")):
        settings_args(sub.add_parser(name, help=text))
    b = sub.add_parser("bench", help="run the benchmark suite (benchmarks/bench_*.py) and print its tables")
    b.add_argument("--full", action="store_true", help="each script's --full size (default: its --quick)")
    b.add_argument("--only", help="comma-separated names, e.g. logprobs,kl")
    b.add_argument("--dir", help="benchmarks folder (default: the source checkout's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("RLHF_FAST_DEBUG") == "1"
    try:
        return _dispatch(args) or 0
    except BrokenPipeError:  # e.g. `rlhf-fast ppo --list-keys | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        print(f"rlhf-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args):
    if args.command == "bench":
        return cmd_bench(args)
    if args.list_keys:
        print(list_keys(args.command), flush=True)
        return 0
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads {args.threads}: must be >= 1")
    if args.command == "demo":
        cfg, run = demo_settings(args)
    else:
        cfg, run = resolve_settings(args.command, args.config, args.sets, args.model)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
    check_start(args.command, cfg)
    _quiet_transformers()
    existed = Path(cfg.output_dir).exists()
    saved = save_settings(args.command, cfg, run)
    try:
        if args.command == "demo":
            return cmd_demo(cfg, run)
        with _torchrun_job(cfg):
            if args.command == "sft":
                return cmd_sft(cfg, run)
            if args.command == "rm":
                return cmd_rm(cfg, run)
            if args.command == "dpo":
                return cmd_dpo(cfg, run)
            if args.command == "best-of-n":
                return cmd_best_of_n(cfg, run)
            if args.command == "label-pairs":
                return cmd_label_pairs(cfg, run)
            return cmd_rl(args.command, cfg, run)
    except BaseException:
        forget_failed_start(saved, existed)
        raise


def _torchrun_job(cfg):
    """Under torchrun (WORLD_SIZE > 1): ``distributed_run`` (join the job; a clean exit leaves
    through the barrier, a failing rank reports itself and skips it). Alone: nothing."""
    import contextlib

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from rlhf_fast.trainer.distributed import distributed_run

    return distributed_run(cfg.device, getattr(cfg, "dist_timeout_s", None))


def demo_settings(args):
    """DemoConfig from --config, --set, --out, --no-kl, --threads; with --quick, the reduced
    size for every key the user did not set."""
    from rlhf_fast.demo import DemoConfig

    sets = list(args.sets)
    if args.out:
        sets.append(f"output_dir={args.out}")
    if args.no_kl:
        sets.append("no_kl_leash=true")
    if args.family:
        sets.append("family=true")
    if args.threads:
        sets.append(f"threads={args.threads}")
    cfg, run = resolve_settings("demo", args.config, sets)
    if args.quick:
        explicit = set(read_yaml(args.config)) if args.config else set()
        explicit |= {s.split("=", 1)[0].strip() for s in sets}
        cfg = DemoConfig.quick(**{k: getattr(cfg, k) for k in explicit})
    return cfg, run


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rank0() -> bool:
    """Rank 0 under torchrun (set before the trainer joins the process group), or not distributed."""
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
