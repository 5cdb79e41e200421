"""Build the README's benchmark tables from the newest run in each results CSV.

    python benchmarks/report.py            # rewrite the README between the bench markers
    python benchmarks/report.py --print    # print the tables only
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import benchlib

README = Path(__file__).resolve().parent.parent / "README.md"
NONE_YET = "_No GPU results committed yet: run `make bench-gpu` on a CUDA machine._"


def _pivot(rows, row_key, col_key, val_key, fmt=lambda v: v):
    cols = []
    for r in rows:
        if r[col_key] not in cols:
            cols.append(r[col_key])
    keys = sorted({int(r[row_key]) for r in rows})
    lines = ["| " + " | ".join([row_key] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for k in keys:
        cells = []
        for c in cols:
            hit = [r for r in rows if int(r[row_key]) == k and r[col_key] == c]
            cells.append(fmt(hit[0][val_key]) if hit and hit[0][val_key] else "–")
        lines.append("| " + " | ".join([f"{k // 1024}K" if k >= 1024 else str(k)] + cells) + " |")
    return "\n".join(lines)


def _footnote(rows):
    r = rows[0]
    return (f"\n\n<sub>{r['device']}; torch {r['torch']}, triton {r['triton']}; commit {r['commit']}; "
            f"run {r['run']}.</sub>")


def prefill_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "prefill.csv")
    if not rows:
        return NONE_YET
    none_off = [r for r in rows if float(r["off"]) == 0]
    out = ["Useful TFLOP/s, no head off:\n", _pivot(none_off, "length", "provider", "tflops")]
    half = [r for r in rows if r["provider"] == "retmask" and r["vs_none_off"]]
    if half:
        out += ["\n\nretmask time relative to no head off (target: <= 0.55 at 50 %):\n",
                _pivot(half, "length", "off", "vs_none_off")]
    return "".join(out) + _footnote(rows)


def decode_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "decode.csv")
    if not rows:
        return NONE_YET
    lens = [r for r in rows if r["sweep"] == "length" and float(r["off"]) == 0]
    out = [f"GB/s of K/V read, no head off (measured copy bandwidth {rows[0]['copy_gbs']} GB/s):\n",
           _pivot(lens, "length", "provider", "gbs")]
    am = [dict(r, what="argmax cost") for r in rows if r["provider"] == "retmask+argmax" and r["sweep"] == "length"
          and float(r["off"]) == 0]
    if am:
        out += ["\n\nArgmax cost (time with / without; target <= 1.05):\n", _pivot(am, "length", "what", "ratio")]
    sh = [dict(r, what=f"{r['rows_per_group']} rows" + (" (unshared)" if "unshared" in r["provider"] else ""))
          for r in rows if r["sweep"] == "shared"]
    if sh:
        out += ["\n\nA group on one shared segment, time relative to one row (target <= 1.2 at 4 rows):\n",
                _pivot(sh, "length", "what", "ratio")]
    sm = [r for r in rows if r["sweep"] == "sampling"]
    if sm:
        out += [f"\n\nSampling one token per row over {sm[0]['length']} logits (temperature 0.6), ms per step:\n",
                _pivot(sm, "batch", "provider", "ms")]
    return "".join(out) + _footnote(rows)


def engine_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "engine.csv")
    if not rows:
        return NONE_YET
    pairs = [r for r in rows if r["sweep"] == "pairs"]
    out = ["Output tokens per second, both policies together (64-token prompts, 512 new tokens):\n",
           _pivot(pairs, "pairs", "provider", "tok_per_s"),
           "\n\nEngine speed-up over `generate` run twice (target: >= 3 at 32+ pairs) and share of the "
           "bandwidth floor (weights + KV bytes per step over copy bandwidth; target: >= 0.60 at 1 pair):\n",
           benchlib.table([r for r in pairs if r["speedup"]],
                          ["pairs", "provider", "decode", "step_ms", "floor_ms", "floor_frac", "speedup", "peak_gb"])]
    long = [r for r in rows if r["sweep"] == "long"]
    if long:
        out += ["\n\nOne pair on a long prompt:\n",
                benchlib.table(long, ["prompt", "new", "scope", "decode", "seconds", "tok_per_s", "peak_gb"])]
    return "".join(out) + _footnote(rows)


def detect_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "detect.csv")
    if not rows and not benchlib.read_latest(benchlib.RESULTS / "detect_causal.csv"):
        return NONE_YET
    out = [] if not rows else [
        "Seconds per detection test (prompt + 50 decode steps with per-head argmax):\n",
        _pivot(rows, "length", "provider", "seconds"),
        "\n\nretmask against its targets (peak <= 40 GB and <= 1.3x the prefill floor at 128K; "
        ">= 10x the reference-style detector at 32K):\n",
        benchlib.table([r for r in rows if r["provider"] == "retmask"],
                       ["length", "seconds", "peak_gb", "floor_s", "vs_floor", "speedup"])]
    sweep = benchlib.read_latest(benchlib.RESULTS / "detect_sweep.csv")
    if sweep:
        out += ["\n\nOne haystack with its needle at each depth (a grid column, one slot, prefix order), with and "
                "without prefix reuse (seconds and floor per test):\n",
                benchlib.table(sweep, ["provider", "length", "depths", "seconds", "computed_tokens", "reused",
                                       "floor_s", "vs_floor", "speedup"])]
    crows = benchlib.read_latest(benchlib.RESULTS / "detect_causal.csv")
    if crows:
        out += ["\n\nThe causal check (`retmask niah`'s 7 policies as rows of one group, 32 decode steps): seconds "
                "and memory per prompt, each prefill stream's prompt KV stored once or each row's:\n",
                benchlib.table(crows, ["provider", "length", "rows", "streams", "seconds", "peak_gb", "cache_gb",
                                       "staging_gb", "weights_gb"])]
    return "".join(out) + _footnote(rows or crows)


def host_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "host.csv")
    if not rows:
        return "_No results committed yet: run `python benchmarks/bench_host.py`._"
    return (benchlib.table(rows, ["kind", "provider", "size", "seconds", "peak_gb", "detail"])
            + f"\n\n<sub>{rows[0]['device']}; commit {rows[0]['commit']}; run {rows[0]['run']}.</sub>")


def cpu_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "cpu.csv")
    if not rows:
        return "_No results committed yet: run `python benchmarks/bench_cpu.py`._"
    r = rows[0]
    return (benchlib.table(rows, ["sweep", "model", "provider", "size", "seconds", "tok_per_s", "peak_rss_gb",
                                  "vs_baseline"])
            + f"\n\n<sub>{r['device']}, {r.get('cores', '?')} cores, {r.get('threads', '?')} torch threads; torch "
              f"{r['torch']}; commit {r['commit']}; run {r['run']}; medians of interleaved runs.</sub>")


def capacity_section() -> str:
    rows = benchlib.read_latest(benchlib.RESULTS / "capacity.csv")
    if not rows:
        return "_No results committed yet: run `python benchmarks/bench_capacity.py`._"
    r = rows[0]
    return (benchlib.table(rows, ["model", "budget_gb", "block_size", "fixed_rows", "paged_rows_median",
                                  "paged_rows_peak", "ratio", "alloc_over_held", "preemptions", "recomputed_pct",
                                  "verdict"])
            + f"\n\n<sub>Simulated on {r['device']} (no weights): RetMask pairs over a trace of {r['pairs']} chats "
              f"(means {r['prompt_mean']} prompt / {r['answer_mean']} answer tokens); medians over the steady state; "
              f"commit {r['commit']}; run {r['run']}.</sub>")


SECTIONS = {"prefill": prefill_section, "decode": decode_section, "engine": engine_section,
            "detect": detect_section, "host": host_section, "cpu": cpu_section,
            "capacity": capacity_section}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print", action="store_true", help="print the tables instead of editing README.md")
    args = ap.parse_args(argv)
    text = README.read_text()
    for name, fn in SECTIONS.items():
        body = fn()
        if args.print:
            print(f"## {name}\n{body}\n")
            continue
        pat = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
        if not pat.search(text):
            print(f"README.md has no <!-- bench:{name} --> markers", file=sys.stderr)
            return 1
        text = pat.sub(lambda m: m.group(1) + body + m.group(2), text)
    if not args.print:
        README.write_text(text)
        print("README.md tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
