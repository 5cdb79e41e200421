"""Run folders that survive crashes: records appended with an fsync each, torn last lines dropped,
an existing run never mixed in silently, and the torchrun rank / world helpers around them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def dist() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist()[1] > 1:
        torch.distributed.barrier()


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum over the ranks (the values themselves outside torchrun)."""
    if dist()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.tolist()


def iter_jsonl(path: Path):
    """Complete lines of a JSONL file, one at a time; a torn last line (a crash mid-write) is ignored."""
    return (rec for _, rec in iter_jsonl_at(path))


def iter_jsonl_at(path: Path):
    """(byte offset, record) of each complete line of a JSONL file, one at a time, as `iter_jsonl`;
    `read_at` reads a record back from its offset."""
    if not path.is_file():
        return
    with path.open("rb") as f:
        offset = 0
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                return
            yield offset, rec
            offset += len(line)


def read_at(f, offset: int) -> dict:
    """The record at `offset` of a JSONL file opened in binary mode."""
    f.seek(offset)
    return json.loads(f.readline())


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    return list(iter_jsonl(path))


def append_record(f, rec: dict) -> None:
    """One JSON line, on disk before this returns."""
    f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


def drop_torn_tail(path: Path) -> None:
    """Rewrite `path` without a torn last line, so appends start on a clean line. The new text goes to a
    temporary file first and replaces `path` in one rename, so a crash here loses nothing."""
    if not path.is_file() or _ends_with_a_whole_record(path):  # the usual case, decided from the tail
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in iter_jsonl(path):
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ends_with_a_whole_record(path: Path, tail: int = 1 << 16) -> bool:
    """Empty, or its last line is complete (newline-terminated) JSON. Records are appended whole, each with
    an fsync, so only the last line can be torn."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return True
        f.seek(max(0, size - tail))
        chunk = f.read()
    if not chunk.endswith(b"\n"):
        return False
    lines = chunk[:-1].rsplit(b"\n", 1)
    if len(lines) == 1 and size > len(chunk):
        return False  # a last line longer than the tail read: let the full pass decide
    try:
        json.loads(lines[-1])
        return True
    except ValueError:
        return False


def finished(folder: Path, pattern: str, keep=None) -> list[dict]:
    """Every record in the shards `folder/pattern` (those `keep(record)` accepts, when given), the same
    list on every rank: rank 0 first drops torn tails (its own shard's and those of ranks a smaller world
    no longer has), every rank then reads, and no rank goes on (and appends) before all have read. Ranks
    that split the remaining work by position in a list built from these records therefore agree on the
    split."""
    return _synced(folder, pattern, lambda recs: [r for r in recs if keep is None or keep(r)])


def done_keys(folder: Path, pattern: str, key: str) -> set:
    """`key` of every record in the shards, read as `finished` reads them (one record in memory at a time)."""
    return _synced(folder, pattern, lambda recs: {r[key] for r in recs})


def _synced(folder: Path, pattern: str, collect):
    if dist()[0] == 0:
        for p in sorted(folder.glob(pattern)):
            drop_torn_tail(p)
    barrier()
    out = collect(r for p in sorted(folder.glob(pattern)) for r in iter_jsonl(p))
    barrier()
    return out


def check_writable(folder, *, keep: bool = False) -> None:
    """Fail before expensive work when the output folder cannot be created or written. The folders this
    creates to find out are removed again unless `keep`, so a check that passes leaves nothing behind."""
    p = Path(folder)
    made = next((a for a in [p, *p.parents][::-1] if not a.exists()), None)  # the first folder to create
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {p} is not writable ({e.strerror}); choose another --out") from None
    if made is not None and not keep and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # (ranks may be probing it)
        shutil.rmtree(made, ignore_errors=True)


def holds_data(p: Path) -> bool:
    """A non-empty file, or a folder with one somewhere inside."""
    if p.is_dir():
        return any(f.is_file() and f.stat().st_size > 0 for f in p.rglob("*"))
    return p.is_file() and p.stat().st_size > 0


def check_same_config(out: Path, old: dict, config: dict, what: str = "a run") -> None:
    """Refuse to resume the run in `out` (configuration `old`) under another configuration, naming the keys
    that differ."""
    if old == config:
        return
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    unrecorded = [k for k in diff if k not in old]
    raise ValueError(f"{out} holds {what} with a different configuration ({', '.join(diff)})" +
                     (f"; {', '.join(unrecorded)} not recorded there: an older retmask wrote it" if unrecorded else "")
                     + "; use another --out or --overwrite")


def prepare_out(out: Path, config: dict, *, resume: bool, overwrite: bool, names: tuple[str, ...],
                unrecorded: dict | None = None) -> None:
    """Make `out` ready: refuse to mix with an existing run unless told how (resume / overwrite). `unrecorded`
    gives the value of a setting that an existing run's config.json lacks (one added since it was written)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_writable(out, keep=True)
    cfg_path = out / "config.json"
    existing = [p for p in out.iterdir() if p.name in names or p.name.startswith(("tests-", "pairs-"))]
    old_cfg = cfg_path.read_text() if cfg_path.exists() else None
    barrier()  # every rank decides from the same snapshot
    if not any(map(holds_data, existing)):
        # a run that stopped before writing anything (bad input found after its start, a crash while loading
        # the model): nothing to keep or continue, so it does not block the next start
        existing, old_cfg = [], None
    if existing or old_cfg is not None:
        if overwrite:
            if dist()[0] == 0:
                for p in existing + ([cfg_path] if old_cfg is not None else []):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            barrier()
        elif resume:
            if old_cfg is not None:
                check_same_config(out, {**(unrecorded or {}), **json.loads(old_cfg)}, config)
        else:
            raise ValueError(f"{out} already holds results; pass --resume to continue them or --overwrite "
                             "to start over")
    barrier()  # every rank has looked before rank 0 writes
    if dist()[0] == 0:
        cfg_path.write_text(json.dumps(config, indent=1) + "\n")
    barrier()
