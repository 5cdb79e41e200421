"""Instructions in: the first user turn of each row of a chat dataset (hub name or local file).

Schemas, detected from the columns:
  - `conversation`: a list of {role, content} turns (LMSYS-Chat-1M, WildChat; extra per-turn
    fields are ignored); also `conversations` and ShareGPT-style {from, value} turns;
  - `messages`: the generic chat format;
  - `synthesized_multiturn_conversation` / other list-of-turns columns of lmsys-chat-1m-synth;
  - plain text: `prompt`, `instruction` (with `input` appended when present), `question`.
The first user turn is taken (a system turn is skipped, never prepended, as the paper). Empty,
redacted and duplicate prompts are skipped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TURN_COLUMNS = ("conversation", "conversations", "messages", "synthesized_multiturn_conversation",
                "synthesized_conversation")
TEXT_COLUMNS = ("prompt", "instruction", "question")
ID_COLUMNS = ("conversation_id", "conversation_hash", "id")  # the source id, first found
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".gz": "json"}


@dataclass
class Instructions:
    """Selected prompts (`items`: (source id, text)) and what was skipped, by reason."""

    items: list[tuple[str, str]]
    skipped: Counter = field(default_factory=Counter)
    schema: str = ""


def _open(source: str, split: str, streaming: bool | None):
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError

    p = Path(source)
    if p.exists():
        files = sorted(str(f) for f in p.iterdir() if f.suffix in LOCAL_FORMATS) if p.is_dir() else [str(p)]
        if not files:
            raise ValueError(f"dataset folder {p} has no .jsonl/.json/.parquet files")
        fmt = LOCAL_FORMATS.get(Path(files[0]).suffix)
        if fmt is None:
            raise ValueError(f"dataset file {p}: use .jsonl, .json or .parquet")
        if all(Path(f).stat().st_size == 0 for f in files):
            raise ValueError(f"dataset {source} is empty")
        try:
            return load_dataset(fmt, data_files=files, split="train", streaming=bool(streaming))
        except (StopIteration, ValueError, OSError, DatasetsError) as e:
            where = _first_bad_json(files) if fmt == "json" else None
            raise ValueError(f"dataset {where or f'{source}: could not read it as {fmt} ({_cause(e)})'}") from None
    if "/" not in source or source.startswith(("/", ".", "~")) or p.suffix in LOCAL_FORMATS:
        raise ValueError(f"dataset {source!r}: no such file; give a local .jsonl/.json/.parquet or a hub name "
                         "such as lmsys/lmsys-chat-1m")
    from .models import hub_reachable

    if not hub_reachable() and streaming is not False:  # streamed from the hub: nothing local to fall back on
        raise ValueError(f"dataset {source!r}: the hub cannot be reached from here (no network, or HF_HUB_OFFLINE=1); "
                         "give a local .jsonl/.json/.parquet")
    try:
        return load_dataset(source, split=split, streaming=True if streaming is None else streaming)
    except (ConnectionError, OSError, DatasetsError) as e:  # offline, a wrong name, a gated set without a login
        raise ValueError(f"dataset {source!r}: could not load it from the hub ({_cause(e)}); check the name, the "
                         "network and `hf auth login`, or give a local .jsonl/.json/.parquet") from None


def _first_bad_json(files: list[str]) -> str | None:
    """`file:line: not JSON (why)` for the first line of a JSON Lines file (or the first .json file) that
    does not parse, or None when every one does: the parser's own message names neither."""
    import gzip
    import json

    for f in files:
        opener = gzip.open if f.endswith(".gz") else open
        try:
            with opener(f, "rt", encoding="utf-8") as fh:
                if f.endswith(".json"):
                    try:
                        json.load(fh)
                    except json.JSONDecodeError as e:
                        return f"{f}:{e.lineno}: not JSON ({e.msg}, column {e.colno})"
                    continue
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            json.loads(line.rstrip())
                        except json.JSONDecodeError as e:
                            return f"{f}:{n}: not JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
        except (OSError, UnicodeDecodeError) as e:
            return f"{f}: cannot be read as UTF-8 JSON ({type(e).__name__}: {e})"
    return None


def _cause(e: BaseException) -> str:
    """The innermost error's first line (datasets wraps a parse error in DatasetGenerationError)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def detect_schema(columns: list[str]) -> str:
    for c in TURN_COLUMNS:
        if c in columns:
            return c
    for c in TEXT_COLUMNS:
        if c in columns:
            return c
    raise ValueError(f"dataset columns {sorted(columns)}: none holds instructions; need one of "
                     f"{list(TURN_COLUMNS)} (a list of chat turns) or {list(TEXT_COLUMNS)} (text)")


def first_user_turn(turns) -> str | None:
    if isinstance(turns, str):
        return turns
    for t in turns or []:
        if not isinstance(t, dict):
            continue
        role = t.get("role", t.get("from"))
        if role in ("user", "human"):
            return t.get("content", t.get("value"))
    return None


def load_instructions(source: str, *, split: str = "train", start: int = 0, end: int | None = None,
                      limit: int | None = None, streaming: bool | None = None,
                      skip_redacted: bool = True) -> Instructions:
    """Rows [start, end) of `source`, first user turns, at most `limit` kept prompts."""
    if start < 0 or (end is not None and end < start) or (limit is not None and limit < 1):
        raise ValueError(f"--start {start} / --end {end} / --limit {limit}: need 0 <= start <= end and limit >= 1")
    ds = _open(source, split, streaming)
    cols = list(ds.column_names or [])
    if not cols:
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"dataset {source} is empty")
        cols = list(first)
    schema = detect_schema(cols)
    # only the columns read below (LMSYS rows also carry e.g. per-turn moderation scores, slow to decode)
    ds = ds.select_columns([c for c in cols if c in (schema, "input", "redacted", *ID_COLUMNS)])
    offset = 0  # the file's row index of ds's first row
    if hasattr(ds, "select") and hasattr(ds, "__len__"):  # a local file: jump to the slice, do not read past rows
        stop = len(ds) if end is None else min(end, len(ds))
        offset = min(start, stop)
        ds = ds.select(range(offset, stop)) if offset < stop else []
    out = Instructions([], Counter(), schema)
    seen: set[str] = set()
    n_rows = 0
    for i, row in enumerate(ds, start=offset):
        if i < start:
            continue
        if end is not None and i >= end:
            break
        n_rows += 1
        text = first_user_turn(row.get(schema)) if schema in TURN_COLUMNS else row.get(schema)
        if schema == "instruction" and row.get("input"):
            text = f"{text}\n\n{row['input']}"
        if text is not None and not isinstance(text, str):
            out.skipped["not_text"] += 1  # e.g. a number in the prompt column
            continue
        text = (text or "").strip()
        if not text:
            out.skipped["empty"] += 1
            continue
        if skip_redacted and bool(row.get("redacted", False)):
            out.skipped["redacted"] += 1
            continue
        if text in seen:
            out.skipped["duplicate"] += 1
            continue
        seen.add(text)
        sid = str(next((row[c] for c in ID_COLUMNS if c in row), i))
        out.items.append((sid, text))
        if limit is not None and len(out.items) >= limit:
            break
    if n_rows == 0:
        raise ValueError(f"dataset {source} has no rows in [{start}, {end})")
    if not out.items:
        raise ValueError(f"dataset {source}: every one of {n_rows} rows was skipped ({dict(out.skipped)})")
    return out
