"""The benchmark scripts' tiny CPU mode runs end to end, so the scripts cannot rot without a GPU."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, out, *extra):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("RETMASK_BACKEND", None)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("script,providers", [
    ("bench_prefill.py", {"retmask", "reference", "sdpa-math", "flex"}),
    ("bench_decode.py", {"retmask", "retmask+argmax", "reference", "sdpa-math", "flex", "retmask fused",
                         "torch reference"}),
])
def test_tiny_mode(tmp_path, script, providers):
    out = tmp_path / "r.csv"
    p = _run(script, out)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert {r["provider"] for r in rows} >= providers
    for r in rows:  # every row carries where and what it ran on
        assert r["device"] and r["torch"] and r["triton"] and r["commit"] and r["run"]
        assert r["max_diff"] == "" or float(r["max_diff"]) < 1e-4  # all providers agree with retmask
    assert out.with_suffix(".png").exists()
    assert "| provider" in p.stdout.splitlines()[-len(rows) - 2]  # the table comes last
    # a second run appends, with the same header
    assert _run(script, out).returncode == 0
    assert len(list(csv.DictReader(open(out)))) == 2 * len(rows)


def _run_model_bench(script, out):
    """A model-level benchmark (no kernels in the interpreter) in its tiny mode; its CSV rows."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return list(csv.DictReader(open(out)))


@pytest.fixture(scope="module")
def model_benches(tmp_path_factory):
    """engine.csv and detect.csv from one tiny run of each model-level benchmark."""
    d = tmp_path_factory.mktemp("results")
    return d, _run_model_bench("bench_engine.py", d / "engine.csv"), _run_model_bench("bench_detect.py",
                                                                                      d / "detect.csv")


def test_report_builds_tables_from_latest_run(tmp_path, monkeypatch, model_benches):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import benchlib
        import report
    finally:
        sys.path.pop(0)
    results, *_ = model_benches
    for name in ("engine", "detect", "detect_sweep", "detect_causal"):
        (tmp_path / f"{name}.csv").write_bytes((results / f"{name}.csv").read_bytes())
    assert _run("bench_prefill.py", tmp_path / "prefill.csv").returncode == 0
    assert _run("bench_decode.py", tmp_path / "decode.csv").returncode == 0
    monkeypatch.setattr(benchlib, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("a\n" + "".join(f"<!-- bench:{n} -->\nold\n<!-- /bench:{n} -->\n"
                                      for n in ("prefill", "decode", "engine", "detect", "host", "cpu", "capacity")))
    monkeypatch.setattr(report, "README", readme)
    assert report.main([]) == 0
    text = readme.read_text()
    assert "old" not in text and "| length | retmask |" in text and "Argmax cost" in text
    assert "| batch | torch reference | retmask fused |" in text  # the sampler sweep
    assert "| pairs | engine (both policies, one pass) |" in text and "One pair on a long prompt" in text
    assert "| length | retmask | reference-style |" in text and "vs_floor" in text
    assert "retmask, prefix reuse" in text and "computed_tokens" in text  # the depth sweep
    assert "| prompt KV per stream |" in text and "staging_gb" in text  # the causal check
    assert text.count("; commit ") == 4 and "bench_host.py" in text  # a footnote per GPU table; no host.csv here
    assert "bench_cpu.py" in text and "bench_capacity.py" in text  # no cpu.csv or capacity.csv here either


def test_engine_benchmark_tiny(model_benches):
    _, rows, _ = model_benches
    assert {r["provider"] for r in rows} == {"engine (both policies, one pass)", "engine, decode eager (no CUDA graph)",
                                             "engine, host in the step (overlap off)",
                                             "engine, sampled (temperature 0.6)", "generate x2 (sdpa, static cache)",
                                             "engine, scope all", "engine, scope generated"}
    assert all(float(r["tok_per_s"]) > 0 for r in rows)
    assert {r["decode"] for r in rows if r["provider"].startswith("engine")} == {"eager"}  # auto on CPU


def test_detect_benchmark_tiny(model_benches):
    results, _, rows = model_benches
    assert {r["provider"] for r in rows} == {"retmask", "reference-style"}
    assert all(float(r["seconds"]) > 0 and float(r["floor_s"]) > 0 for r in rows)
    sweep = {r["provider"]: r for r in csv.DictReader(open(results / "detect_sweep.csv"))}
    off, on = sweep["retmask, no reuse"], sweep["retmask, prefix reuse"]
    L, n = int(on["length"]), int(on["depths"])
    assert int(off["computed_tokens"]) == n * (L - 1) and float(off["reused"]) == 0
    # the needle at depths linspace(0, 100) of an (L - 48)-token haystack: every prompt but the deepest reuses
    # the haystack before its needle (a few tokens more where the needle happens to start like the haystack)
    # (whole blocks of 32 tokens, the engine's default)
    cuts = [round(i / (n - 1) * (L - 48)) for i in range(n - 1)]
    lo, hi = sum(c // 32 * 32 for c in cuts), sum((c + 4) // 32 * 32 for c in cuts)
    assert lo <= int(off["computed_tokens"]) - int(on["computed_tokens"]) <= hi
    assert float(on["floor_s"]) < float(off["floor_s"])
    # the causal check: 7 rows reading the prompt 4 ways; the group holds each way's prompt KV once (K and V,
    # fp32, 2 KV heads of 16, 4 layers, blocks of 32 tokens), and each row's new tokens
    crows = list(csv.DictReader(open(results / "detect_causal.csv")))
    kinds = ("prompt KV per stream", "prompt KV per row")
    assert {(r["provider"], r["length"]) for r in crows} == {(p, L) for p in kinds for L in ("96", "160")}
    for r in crows:
        L, steps, tb = int(r["length"]), int(r["steps"]), 2 * 2 * 16 * 4
        assert (int(r["rows"]), int(r["streams"])) == (7, 4) and float(r["seconds"]) > 0
        blocks = lambda n: -(-n // 32) * 32  # noqa: E731  (tokens in whole blocks)
        per_stream = tb * 4 * (4 * blocks(L - 1) + 7 * blocks(steps))
        per_row = tb * 4 * 7 * (blocks(L - 1) + blocks(steps))
        want = per_row if r["provider"] == "prompt KV per row" else per_stream
        assert abs(float(r["cache_gb"]) * 1e9 - want) <= 1e-3 * want, (r, want)


def test_rows_reach_the_csv_as_they_are_made(tmp_path):
    """A benchmark cut short by its time limit keeps every row it finished."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import benchlib
    finally:
        sys.path.pop(0)
    rows = benchlib.RowLog(tmp_path / "r.csv", {"copy_gbs": "100"})
    rows.append({"run": "1", "length": "4096", "ms": "0.5"})
    assert list(csv.DictReader(open(tmp_path / "r.csv"))) == [{"run": "1", "length": "4096", "ms": "0.5",
                                                               "copy_gbs": "100"}]
    rows += [{"run": "1", "length": "8192", "ms": "0.9"}]
    assert [r["length"] for r in csv.DictReader(open(tmp_path / "r.csv"))] == ["4096", "8192"] and len(rows) == 2
    with pytest.raises(ValueError, match="columns"):
        rows.append({"run": "1", "other": "x"})


def test_engine_host_time_script_runs():
    """scripts/engine_host_time.py (the host-time measurement in the README) runs, in a small size."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "engine_host_time.py"), "--pairs", "4", "--layers", "2",
                        "--heads", "4", "--new", "3"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "8 slots, 2 layers x 4 heads, 3 steps: host time per step outside the forward" in p.stdout
    assert "ms (launch" in p.stdout and "ms, collection" in p.stdout


def test_host_benchmark_tiny(tmp_path):
    """bench_host.py (the host-side costs quoted in the README) runs its tiny mode: both providers of each
    kind, in child processes, agree on what they built."""
    out = tmp_path / "host.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert [(r["kind"], r["provider"]) for r in rows] == [("prompts", "retmask"), ("prompts", "retmask-rank0of8"),
                                                          ("prompts", "per-test"),
                                                          ("merge", "load-all"), ("merge", "retmask"),
                                                          ("dataset", "retmask"), ("dataset", "list")]
    whole, rank0 = rows[0], rows[1]
    for kind in ("prompts", "dataset"):  # the same prompt tokens, the same rows
        assert len({r["detail"] for r in rows if r["kind"] == kind and r is not rank0}) == 1
    n_tests = int(whole["size"].split()[0])
    assert int(rank0["size"].split()[0]) == -(-n_tests // 8)  # one of 8 ranks builds its eighth (36 tests: 5)
    assert all(float(r["seconds"]) > 0 and float(r["peak_gb"]) > 0 and r["commit"] for r in rows)
    assert "| kind" in p.stdout.splitlines()[-len(rows) - 2]


def test_prefix_reuse_counts():
    """scripts/prefix_reuse.py (the README's FLOP counts): a 10-depth column reuses, for each needle below
    depth 100, the haystack before it: sum of i/9 for i < 9 = 4 of 10 prompts' worth, 40 %, less under a
    block (32 tokens) per prompt: 39 % at 4K."""
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "prefix_reuse.py"), "--lookup"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == 0, p.stderr[-2000:]
    cols = [line for line in p.stdout.splitlines() if line.startswith("| one column")]
    assert len(cols) == 3 and all(("| 40% |" if "4K" not in line else "| 39% |") in line for line in cols), p.stdout
    assert "prefix lookup among 512 cached prompts" in p.stdout


def test_cpu_benchmark_quick(tmp_path):
    """bench_cpu.py's smoke mode: both sides of each comparison measured, in the same run."""
    out = tmp_path / "cpu.csv"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu.py"), "--quick", "--models", "toy",
                        "--pairs", "1", "--vocab-lengths", "", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    assert {(r["sweep"], r["provider"]) for r in rows} == {("pairs", "retmask engine"), ("pairs", "generate x2"),
                                                           ("detect", "retmask"), ("detect", "reference-style")}
    assert len({r["run"] for r in rows}) == 1 and all(float(r["seconds"]) > 0 for r in rows)
    assert all(float(r["peak_rss_gb"]) > 0 for r in rows if r["sweep"] == "detect")
