"""Host-side cost of the long jobs at full scale, on the CPU: what runs before and after the GPU work.

Kinds (each measurement runs in a fresh process, which reports its seconds and peak resident memory):
  - `prompts`: building the NIAH prompts of a detection grid (default: the `128k` preset, 600 tests).
    `retmask` is `GridConfig.unique_prompts` (each haystack tokenized once, a batch of prompts per
    tokenizer call, int32 arrays); `retmask-rank0ofN` is what one of N torchrun ranks builds (its share,
    `--world`); `per-test` builds each prompt on its own with `prompt_ids`, as the reference detector
    does, kept as Python lists.
  - `merge`: the end of `retmask pairs` on N synthetic pairs of the paper's average lengths (63.6
    prompt / 494.7 answer tokens; default 294K, its main run) in 8 rank files. `retmask` is
    `PairJob.merge`; `load-all` reads every record into a dict and writes with gzip's default level.
  - `dataset`: the DPO training set from those shards. `retmask` is `train.dpo_dataset` (streamed
    into memory-mapped Arrow); `list` is `Dataset.from_list` over every pair loaded as Python objects.

The tokenizer is a 32K byte-level BPE trained on the haystack (the Llama-3 / Qwen kind), or a real
one with `--tokenizer PATH` (a local folder); the haystack is the built-in synthetic one or the
reference's folder with `--haystack PATH`.

    python benchmarks/bench_host.py                                  # prompts, merge, dataset
    python benchmarks/bench_host.py prompts --haystack PATH/reference_haystack
    python benchmarks/bench_host.py --tiny                           # seconds, for the tests
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

KINDS = ("prompts", "merge", "dataset")
WORDS = ("the of and to in is was that for on with as by at from it an be this are which or his had not but "
         "she they we you have has were been their there what when who will would about into than then").split()


def _peak_gb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process image; `ru_maxrss` would carry
    over the parent's peak into a child started by subprocess."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else ():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # elsewhere (KiB on Linux)


# ---- setup (in the parent) -------------------------------------------------------------------------


def build_tokenizer(text: str, folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", model_max_length=131072)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok.save_pretrained(folder)


def write_pairs(work: Path, n: int, ranks: int = 8, seed: int = 0) -> int:
    """n pair records in `ranks` work files, out of id order (as ranks finish them); returns bytes."""
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731  (~1.3 tokens a word)
    files = [(work / f"rank-{r:05d}.jsonl").open("w") for r in range(ranks)]
    ids = list(range(n))
    rng.shuffle(ids)
    for k, i in enumerate(ids):
        rec = {"id": i, "source_id": f"lmsys-{i}", "prompt": [{"role": "user", "content": text(49)}],
               "chosen": [{"role": "assistant", "content": text(380)}],
               "rejected": [{"role": "assistant", "content": text(380)}],
               "dropped": "identical" if i % 50 == 0 else None,
               "meta": {"prompt_tokens": 64, "chosen_tokens": 495, "rejected_tokens": 495, "chosen_finish": "eos",
                        "rejected_finish": "eos", "seeds": [2 * i, 2 * i + 1], "heads_sha": "0" * 16, "model": "m",
                        "reject_model": None, "scope": "all"}}
        files[k % ranks].write(json.dumps(rec) + "\n")
    for f in files:
        f.close()
    return sum(p.stat().st_size for p in work.glob("rank-*.jsonl"))


# ---- one measurement (in a child) ------------------------------------------------------------------


def measure(kind: str, provider: str, a: dict) -> dict:
    if kind == "prompts":
        from transformers import AutoTokenizer

        from retmask import niah

        tok = AutoTokenizer.from_pretrained(a["tokenizer"])
        g = niah.GridConfig(**a["grid"])
        ns, hs, tests = g.load()
        t = time.perf_counter()
        if provider.startswith("retmask"):
            world = int(provider.rpartition("of")[2]) if "-rank0of" in provider else 1
            items = g.unique_prompts(tok, ns, hs, tests, world=world)
            n_tok = sum(len(p) for p, _ in items)
            n_tests = sum(len(ts) for _, ts in items)
        else:
            prompts = [niah.prompt_ids(tok, hs[x.needle_idx], ns[x.needle_idx], x.length, x.depth,
                                       placement=g.placement, buffer=g.buffer) for x in tests]
            n_tok, n_tests = sum(len(p) for p in prompts), len(tests)
        return {"seconds": time.perf_counter() - t, "items": n_tests, "tokens": n_tok}
    run = Path(a["run"])
    n = a["pairs"]
    t = time.perf_counter()
    if kind == "merge":
        from retmask.pairs import PairJob, PairsConfig
        from retmask.runs import read_jsonl

        for p in run.glob("*.jsonl.gz"):
            p.unlink()
        if provider == "retmask":
            job = PairJob(None, None, None, PairsConfig(), model_name="m", reject=(None, None), reject_name="r")
            job.merge(run, [("s", "t")] * n, 0, 1.0)
        else:
            recs = {r["id"]: r for p in sorted((run / "work").glob("rank-*.jsonl")) for r in read_jsonl(p)}
            kept = [recs[i] for i in range(n) if recs[i]["dropped"] is None]
            for s in range(0, len(kept), 10_000):
                with gzip.open(run / f"pairs-{s // 10_000:05d}.jsonl.gz", "wt") as f:
                    for r in kept[s: s + 10_000]:
                        f.write(json.dumps({k: v for k, v in r.items() if k != "dropped"}) + "\n")
        return {"seconds": time.perf_counter() - t, "items": n,
                "bytes": sum(p.stat().st_size for p in run.glob("pairs-*.jsonl.gz"))}
    if provider == "retmask":
        from retmask.train import dpo_dataset

        with tempfile.TemporaryDirectory() as cache:
            ds = dpo_dataset(run, cache)
            rows = len(ds)
    else:
        from datasets import Dataset

        from retmask.pairs import load_pairs

        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_pairs(run)])
        rows = len(ds)
    return {"seconds": time.perf_counter() - t, "items": rows}


def child(kind: str, provider: str, args: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, provider, args])],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{kind}/{provider} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kinds", nargs="*", help=f"what to measure: {', '.join(KINDS)} (default: all)")
    ap.add_argument("--tiny", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--preset", default="128k", help="detection grid preset (prompts)")
    ap.add_argument("--world", type=int, default=8, help="torchrun ranks whose rank-0 share is measured (prompts)")
    ap.add_argument("--haystack", help="haystack file or folder (the reference layout brings its needles)")
    ap.add_argument("--tokenizer", help="a local tokenizer folder instead of the BPE trained on the haystack")
    ap.add_argument("--pairs", type=int, default=294_000, help="synthetic pairs (merge, dataset)")
    ap.add_argument("--out", default=str(benchlib.RESULTS / "host.csv"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        kind, provider, args = json.loads(a.child)
        res = measure(kind, provider, args)
        print(json.dumps({**res, "peak_gb": _peak_gb()}))
        return 0
    kinds = a.kinds or list(KINDS)
    if set(kinds) - set(KINDS):
        ap.error(f"unknown kind(s) {sorted(set(kinds) - set(KINDS))}: use {', '.join(KINDS)}")
    rows = benchlib.RowLog(Path(a.out))  # each row on disk as it is measured
    st = benchlib.stamp()
    with tempfile.TemporaryDirectory(prefix="retmask-host-") as tmp:
        tmp = Path(tmp)
        if "prompts" in kinds:
            from retmask import niah

            grid = {**niah.GRID_PRESETS[a.preset], "haystack": a.haystack}
            if a.tiny:
                grid.update(min_len=500, max_len=4000, n_lengths=4, n_depths=3)
            tokenizer = a.tokenizer
            if tokenizer is None:
                _, hs = niah.load_source(None, a.haystack, 3)
                tokenizer = str(tmp / "tokenizer")
                build_tokenizer(" ".join(dict.fromkeys(hs)), Path(tokenizer), 2000 if a.tiny else 32000)
            for provider in ("retmask", f"retmask-rank0of{a.world}", "per-test"):
                r = child("prompts", provider, {"tokenizer": tokenizer, "grid": grid})
                rows.append({**st, "kind": "prompts", "provider": provider, "size": f"{r['items']} tests",
                             "seconds": round(r["seconds"], 2), "peak_gb": round(r["peak_gb"], 3),
                             "detail": f"{r['tokens'] / 1e6:.2f}M prompt tokens"})
        if "merge" in kinds or "dataset" in kinds:
            n = 2000 if a.tiny else a.pairs
            run = tmp / "pairs"
            size = write_pairs(run / "work", n)
            if "merge" not in kinds:  # the dataset reads the shards of a merge
                child("merge", "retmask", {"run": str(run), "pairs": n})
            for kind in [k for k in ("merge", "dataset") if k in kinds]:
                # merge: retmask last, so its shards are the ones the dataset reads
                for provider in ("load-all", "retmask") if kind == "merge" else ("retmask", "list"):
                    r = child(kind, provider, {"run": str(run), "pairs": n})
                    detail = (f"{size / 1e9:.2f} GB of work files -> {r['bytes'] / 1e9:.3f} GB gz" if kind == "merge"
                              else f"{r['items']} rows")
                    rows.append({**st, "kind": kind, "provider": provider, "size": f"{n} pairs",
                                 "seconds": round(r["seconds"], 2), "peak_gb": round(r["peak_gb"], 3),
                                 "detail": detail})
    print(benchlib.table(rows, ["kind", "provider", "size", "seconds", "peak_gb", "detail"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
