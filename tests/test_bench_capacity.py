"""bench_capacity.py's smoke mode: the fixed-slot baseline, the CSV it writes, paged rows above fixed ones."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_capacity_quick(tmp_path):
    out = tmp_path / "capacity.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_capacity.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"),
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    for col in ("run", "device", "torch", "commit", "model", "budget_gb", "block_size", "fixed_rows", "fixed_row_mb",
                "paged_blocks", "paged_rows_median", "paged_rows_peak", "ratio", "alloc_over_held", "preemptions",
                "verdict"):
        assert col in rows[0], col
    assert {(r["model"], r["budget_gb"], r["block_size"]) for r in rows} == {
        (m, b, s) for m in ("Llama-3.1-8B", "Qwen3-8B") for b in ("45", "86") for s in ("32", "16")}
    assert len(rows) == 8 and len({r["run"] for r in rows}) == 1
    llama = {r["budget_gb"]: r for r in rows if r["model"] == "Llama-3.1-8B"}
    assert (llama["45"]["fixed_rows"], llama["86"]["fixed_rows"]) == ("115", "231")
    assert llama["45"]["fixed_row_mb"] == "352.45"
    for r in rows:
        assert int(r["paged_rows_median"]) > int(r["fixed_rows"]), r
        assert int(r["paged_rows_peak"]) >= int(r["paged_rows_median"])
        assert 1.0 <= float(r["alloc_over_held"]) < 2.0
    lines = p.stdout.strip().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    assert len(lines) - head == 2 + len(rows) and all(line.startswith("|") for line in lines[head:])  # table last
    assert (tmp_path / "capacity.png").exists()
