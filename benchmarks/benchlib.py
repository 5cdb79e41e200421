"""What every benchmark script shares: timing, environment stamp, CSV rows, tables and plots."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def stamp() -> dict:
    """Device, versions, commit and date carried by every result row."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "none"
    commit = os.environ.get("RETMASK_COMMIT")  # a copy without .git (a GPU machine) can pass it
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return {
        "run": _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "device": gpu,
        "torch": torch.__version__,
        "triton": tv,
        "commit": commit,
    }


def median_ms(fn, *, warmup_ms: float = 100, rep_ms: float = 400, graph: bool = False) -> float:
    """Median time of fn() in ms: triton.testing.do_bench on CUDA (events, cache flushed between
    runs), a wall-clock median of a few runs on CPU (the tiny mode only checks the scripts work).

    `graph=True`: the calls are captured in a CUDA graph and replayed (do_bench_cudagraph), so a
    kernel shorter than its launcher's host work (a decode over a few MB) is timed, not the Python
    around it; a call that cannot be captured falls back to do_bench."""
    if torch.cuda.is_available():
        import triton.testing

        if graph:
            try:
                return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
            except Exception as e:  # noqa: BLE001  (not capturable: time it the plain way)
                print(f"CUDA graph timing failed ({type(e).__name__}: {str(e)[:80]}); timing without a graph")
                torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Measured device copy bandwidth, bytes read + bytes written per second, in GB/s."""
    n = nbytes // 2 if device.type == "cuda" else 1 << 24
    src = torch.randn(n // 2, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV (header written once); an existing file with other columns is an error."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0].keys())
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            head = next(csv.reader(f), [])
        if head != fields:
            raise ValueError(f"{path}: its columns {head} differ from this script's {fields}; "
                             "write to a new file with --out")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def read_latest(path: Path) -> list[dict]:
    """Rows of the newest run in a results CSV."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return []
    last = max(r["run"] for r in rows)
    return [r for r in rows if r["run"] == last]


def table(rows: list[dict], cols: list[str]) -> str:
    """A GitHub table (tabulate's when it is installed, else a plain one)."""
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    try:
        from tabulate import tabulate
    except ImportError:
        return "\n".join("| " + " | ".join(line) + " |" for line in [cols, ["---"] * len(cols)] + cells)
    return tabulate(cells, headers=cols, tablefmt="github", disable_numparse=True)


class RowLog(list):
    """Result rows that reach the CSV as they are made (`append_rows` per row), so a run cut short
    by a time limit keeps every finished measurement. `extra` columns go at the end of each row."""

    def __init__(self, path: Path, extra: dict | None = None):
        super().__init__()
        self.path, self.extra = Path(path), dict(extra or {})

    def append(self, row: dict) -> None:
        row = {**row, **self.extra}
        append_rows(self.path, [row])
        super().append(row)

    def extend(self, rows) -> None:
        for r in rows:
            self.append(r)

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def plot(rows: list[dict], x: str, y: str, series: str, path: Path, title: str, facet: str | None = None,
         ylabel: str | None = None, hline: float | None = None, hline_label: str = "") -> Path | None:
    """One line per series, y against x (log2 x axis); one panel per facet value. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    facets = sorted({r[facet] for r in rows}) if facet else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(5.5 * len(facets), 4), squeeze=False, sharey=True)
    for ax, fv in zip(axes[0], facets):
        sel = [r for r in rows if facet is None or r[facet] == fv]
        for name in sorted({r[series] for r in sel}):
            pts = sorted((float(r[x]), float(r[y])) for r in sel if r[series] == name and r[y] not in ("", "nan"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if hline:
            ax.axhline(hline, color="grey", linestyle="--", label=hline_label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_title(f"{facet} = {fv}" if facet else title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel or y)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def keep_bitmap(b: int, hq: int, off: float, device, seed: int = 0) -> torch.Tensor:
    """(B, Hq) bool with round(off * Hq) heads off per row, chosen at random (seeded)."""
    g = torch.Generator().manual_seed(seed)
    n_off = round(off * hq)
    ranks = torch.rand(b, hq, generator=g).argsort(dim=1).argsort(dim=1)  # a random permutation per row
    return (ranks >= n_off).to(device)


def resolve_mode(args, name: str, tiny: dict, interpreter: bool = True) -> torch.device | None:
    """The device a benchmark runs on. With --tiny: apply the tiny overrides, send results to
    runs/bench/<name>_tiny.csv unless --out was given, and (interpreter=True) run the Triton
    kernels in the interpreter. Without --tiny and without CUDA: print why and return None."""
    if args.tiny:
        if interpreter:
            if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise SystemExit("--tiny runs the Triton kernels on the CPU: set TRITON_INTERPRET=1")
            os.environ["RETMASK_BACKEND"] = "triton"
        for k, v in tiny.items():
            setattr(args, k, v)
        if args.out == RESULTS / f"{name}.csv":
            args.out = Path(f"runs/bench/{name}_tiny.csv")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        import sys

        print("No CUDA device: run with --tiny on a CPU" + (" (TRITON_INTERPRET=1)." if interpreter else "."),
              file=sys.stderr)
        return None
    return torch.device("cuda")
