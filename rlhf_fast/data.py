"""Datasets for the RLHF stages: reading, checking and writing their rows.

    sft          {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
    preferences  {"prompt": str, "chosen": str, "rejected": str}  or the conversational
                 {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    prompts      {"prompt": str | [messages], **columns}   (columns reach reward functions)

    rows = load_sft(path)            # also load_preferences(path), load_prompts(path), load_prompt_rows(path)

A source is a JSONL file (one JSON object a line), or a Hugging Face ``datasets`` dataset: a
``save_to_disk`` folder (its "train" split when it holds several) or a ``.parquet`` file.
Messages have a ``role`` (system / user / assistant / tool) and a string ``content``. A
malformed row (bad JSON, a missing or mistyped field, a blank line) raises ``DataError`` naming
the file and the line (row); nothing is skipped; an empty dataset is an error too.

Tokenization (chat templates, stop tokens, padding) is ``rlhf_fast.encoding``'s.
"""
from __future__ import annotations

import json
import os

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
PROMPT_FIELDS = ("prompt",)
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A dataset that cannot be used as it is; the message names the file and line (row)."""


# ---------------------------------------------------------------------------- reading rows
def read_rows(path) -> list[tuple[str, object]]:
    """``(where, row)`` for every row of a JSONL file, a ``datasets`` folder or a parquet file
    (``where`` is "file:line" or "file row N"); rows are not validated here."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _dataset_rows(path, "folder")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        return _dataset_rows(path, "parquet")
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named like any other bad line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line = _utf8(where, raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw)  # a BOM
            if not line.strip():
                raise DataError(f"{where}: blank line (every line must be one JSON object)")
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _utf8(where: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at byte {e.start + 1} of the "
                        "line; save the file as UTF-8)") from None


def _dataset_rows(path: str, kind: str) -> list[tuple[str, object]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency of the CLI's data input
        raise DataError(f"{path}: reading a {kind} dataset needs the `datasets` package") from None
    log, quiet = datasets.utils.logging, datasets.utils.are_progress_bars_disabled()
    level = log.get_verbosity()
    datasets.disable_progress_bars()  # a local file: no "Generating train split" bar on stderr,
    log.set_verbosity(log.CRITICAL)  # nor datasets' own log line of the error raised below
    try:
        ds = datasets.load_from_disk(path) if kind == "folder" else datasets.Dataset.from_parquet(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable datasets {kind} ({e})") from None
    finally:
        log.set_verbosity(level)
        if not quiet:
            datasets.enable_progress_bars()
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)}); "
                            "point at one split's folder")
        ds = ds["train"]
    rows, it = [], iter(ds)
    while True:  # row by row, so a row that cannot be decoded (text that is not UTF-8) is named
        where = f"{path} row {len(rows)}"
        try:
            row = next(it)
        except StopIteration:
            return rows
        except (UnicodeDecodeError, ValueError, OSError) as e:
            raise DataError(f"{where}: cannot be read ({type(e).__name__}: {e})"[:400]) from None
        rows.append((where, row))


def check_messages(where: str, key: str, value, *, final_assistant: bool = False) -> list[dict]:
    """``value`` as a list of ``{"role", "content"}`` (extra keys kept); a DataError otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of messages, got {type(value).__name__}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise DataError(f"{where}: {key}[{j}] must be a message {{'role': one of {list(ROLES)}, "
                            f"'content': str}}, got {m!r}"[:300])
    if final_assistant and value[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must end with an assistant message")
    return value


def _row(where, obj, fields):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with keys {list(fields)}, got {type(obj).__name__}")
    for k in fields:
        if k not in obj:
            raise DataError(f"{where}: missing key {k!r} (expected keys {list(fields)}, got {sorted(obj)})")
    return obj


def _string(where, obj, k):
    v = obj[k]
    if not isinstance(v, str):
        raise DataError(f"{where}: {k!r} must be a string, got {type(v).__name__}")
    if k != "prompt" and not v:
        raise DataError(f"{where}: {k!r} is empty")
    return v


def _rows(path, parse) -> list:
    out = [parse(where, obj) for where, obj in read_rows(path)]
    if not out:
        raise DataError(f"{os.fspath(path)}: empty dataset")
    return out


def load_jsonl(path, fields) -> list[dict]:
    """Reads ``path`` and returns, per row, ``{field: str}`` for ``fields`` (string fields;
    ``prompt`` may be empty, the others may not)."""
    return _rows(path, lambda where, obj: {k: _string(where, _row(where, obj, fields), k) for k in fields})


def load_sft(path) -> list[dict]:
    """``{"prompt", "response"}`` strings or ``{"messages": [...]}`` rows -> list of dicts."""
    def parse(where, obj):
        if isinstance(obj, dict) and "messages" in obj:
            msgs = check_messages(where, "messages", obj["messages"])
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"{where}: 'messages' holds no assistant message (nothing to train on)")
            return {"messages": msgs}
        _row(where, obj, SFT_FIELDS)
        return {k: _string(where, obj, k) for k in SFT_FIELDS}
    return _rows(path, parse)


def load_preferences(path) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` rows (strings, or conversational: a prompt of
    messages and assistant messages for chosen / rejected) -> list of dicts."""
    def parse(where, obj):
        _row(where, obj, PREFERENCE_FIELDS)
        if isinstance(obj["chosen"], list) or isinstance(obj["prompt"], list):
            row = {"prompt": check_messages(where, "prompt", obj["prompt"]),
                   "chosen": check_messages(where, "chosen", obj["chosen"], final_assistant=True),
                   "rejected": check_messages(where, "rejected", obj["rejected"], final_assistant=True)}
        else:
            row = {k: _string(where, obj, k) for k in PREFERENCE_FIELDS}
        if row["chosen"] == row["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
        return row
    return _rows(path, parse)


def load_prompt_rows(path) -> list[dict]:
    """``{"prompt": str | [messages], **columns}`` rows, every column kept (reward functions
    receive them as keyword arguments)."""
    def parse(where, obj):
        _row(where, obj, PROMPT_FIELDS)
        p = obj["prompt"]
        if not isinstance(p, (str, list)):
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type(p).__name__}")
        if isinstance(p, list):
            check_messages(where, "prompt", p)
        return dict(obj)
    return _rows(path, parse)


def load_prompts(path) -> list:
    """The ``prompt`` of every row (a string, or a list of messages)."""
    return [r["prompt"] for r in load_prompt_rows(path)]


def write_jsonl(path, rows) -> None:
    """Writes dicts one per line (the inverse of ``load_jsonl``), atomically: a failure (a full
    disk) leaves the old file or none, and is a WriteError naming ``path``."""
    from rlhf_fast.trainer.fileio import write_atomic, writing

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with writing(path, "rows"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, text.encode("utf-8"))
