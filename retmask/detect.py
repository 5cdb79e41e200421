"""Retrieval-head detection: the needle-in-a-haystack grid run on the engine, scored per head.

Each unique prompt runs once as a group of one row (the original policy): chunked prefill with no
logits, then `steps` greedy decode steps with no EOS stop, with each head's attention argmax taken
by the decode kernel. Tests with identical prompts (e.g. every depth < 100 under `faithful`
placement) are computed once and recorded once per test. Every finished test is appended to a
shard file at once (`tests-RRRRR.jsonl`, one per rank under torchrun), so a crash loses only the
tests in flight and `resume=True` continues. The merge writes:

    head_scores.json   reference format {"layer-head": [score of each counted test]}
    detect.json        configuration, statistics, NIAH table and the per-head mean scores
    tests.jsonl        every test in grid order (response, ROUGE, counted, per-head scores)
    heads.png          layer x head heatmap of the mean scores
    niah.png           length x depth heatmap of ROUGE-1 recall
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import niah, scoring
from .engine import ORIGINAL, Engine, GenConfig, Group
from .heads import head_name, score_stats

PRESETS = {
    # Wu et al.'s README run and RetMask's released runs (lengths 0-5000)
    "wu": dict(min_len=1000, max_len=50000),
    "retmask": dict(min_len=0, max_len=5000),
    "128k": dict(min_len=4000, max_len=128000),
}


@dataclass(frozen=True)
class DetectConfig:
    min_len: int = 1000
    max_len: int = 50000
    n_lengths: int = 20
    n_depths: int = 10
    n_needles: int = 3
    needles: str | None = None  # JSONL; None: the built-in synthetic needles
    haystack: str | None = None  # file or folder; None: the built-in synthetic haystack
    placement: str = "sentence"
    buffer: int = 200
    steps: int = 50
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    seed: int = 0

    @classmethod
    def preset(cls, name: str, **kw) -> "DetectConfig":
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})

    def check(self):
        if self.placement not in niah.PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}: use one of {niah.PLACEMENTS}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        niah.grid(self.min_len, self.max_len, self.n_lengths, self.n_depths, self.n_needles)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier():
    if _dist()[1] > 1:
        torch.distributed.barrier()


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSONL file; a torn last line (a crash mid-write) is ignored."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _append(f, rec: dict):
    f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())


def prepare_out(out: Path, config: dict, *, resume: bool, overwrite: bool, names: tuple[str, ...]) -> None:
    """Make `out` ready: refuse to mix with an existing run unless told how (resume / overwrite)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {out} is not writable ({e.strerror}); choose another --out") from None
    cfg_path = out / "config.json"
    existing = [p for p in out.iterdir() if p.name in names or p.name.startswith(("tests-", "pairs-"))]
    old_cfg = cfg_path.read_text() if cfg_path.exists() else None
    _barrier()  # every rank decides from the same snapshot
    if existing or old_cfg is not None:
        if overwrite:
            if _dist()[0] == 0:
                import shutil

                for p in existing + ([cfg_path] if old_cfg is not None else []):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            _barrier()
        elif resume:
            old = json.loads(old_cfg) if old_cfg is not None else None
            if old is not None and old != config:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ValueError(f"{out} holds a run with a different configuration ({', '.join(diff)}); "
                                 "use another --out or --overwrite")
        else:
            raise ValueError(f"{out} already holds results; pass --resume to continue them or --overwrite "
                             "to start over")
    _barrier()  # every rank has looked before rank 0 writes
    if _dist()[0] == 0:
        cfg_path.write_text(json.dumps(config, indent=1) + "\n")
    _barrier()


class Detector:
    """Runs a DetectConfig on a model. `engine_kw` go to the Engine (slots / kv_budget_gb, chunk)."""

    def __init__(self, model, tokenizer, cfg: DetectConfig, *, model_name: str = "model", **engine_kw):
        cfg.check()
        self.model, self.tok, self.cfg, self.model_name = model, tokenizer, cfg, model_name
        self.engine_kw = engine_kw
        self.needles, self.haystacks = niah.load_source(cfg.needles, cfg.haystack, cfg.n_needles, seed=cfg.seed)
        self.tests = niah.grid(cfg.min_len, cfg.max_len, cfg.n_lengths, cfg.n_depths, len(self.needles))

    def config_dict(self) -> dict:
        return {"model": self.model_name, **asdict(self.cfg)}

    def prompts(self, tests) -> dict[tuple, list]:
        """Unique prompt -> the tests that use it (in grid order)."""
        out: dict[tuple, list] = {}
        for t in tests:
            p = tuple(niah.prompt_ids(self.tok, self.haystacks[t.needle_idx], self.needles[t.needle_idx], t.length,
                                      t.depth, placement=self.cfg.placement, buffer=self.cfg.buffer, chat=self.cfg.chat))
            out.setdefault(p, []).append(t)
        return out

    def run(self, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
        out = Path(out)
        rank, world = _dist()
        prepare_out(out, self.config_dict(), resume=resume, overwrite=overwrite,
                    names=("head_scores.json", "detect.json", "tests.jsonl", "heads.png", "niah.png"))
        done = {r["key"] for p in out.glob("tests-*.jsonl") for r in read_jsonl(p)}
        todo = [t for t in self.tests if t.key not in done]
        groups = list(self.prompts(todo).items())
        mine = groups[rank::world]
        shard = out / f"tests-{rank:05d}.jsonl"
        self._truncate_torn(shard)
        if mine:
            self._generate(mine, shard, progress and rank == 0)
        _barrier()
        summary = self.merge(out) if rank == 0 else {}
        _barrier()
        return summary

    @staticmethod
    def _truncate_torn(path: Path):
        if path.is_file():
            good = read_jsonl(path)
            text = "".join(json.dumps(r) + "\n" for r in good)
            if path.read_text() != text:
                path.write_text(text)

    def _generate(self, groups, shard: Path, progress: bool):
        from tqdm.auto import tqdm

        cfg, tok = self.cfg, self.tok
        longest = max(len(p) for p, _ in groups)
        kw = dict(self.engine_kw)
        kw.setdefault("max_len", longest + cfg.steps)
        kw.setdefault("private_len", cfg.steps)  # original rows only: the prompt KV lives in the shared pool
        if "slots" not in kw and "kv_budget_gb" not in kw:
            kw["slots"] = 4
        gen = GenConfig(max_new_tokens=cfg.steps, eos_ids=(), return_argmax=True)
        answers = [tok(n.real_needle, add_special_tokens=False)["input_ids"] for n in self.needles]
        n_tests = sum(len(ts) for _, ts in groups)
        bar = tqdm(total=n_tests, desc="detect", unit="test", disable=not progress)
        t0, n_tok = time.perf_counter(), [0]

        def on_step(n):
            n_tok[0] += n
            bar.set_postfix_str(f"{n_tok[0] / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)

        items = [Group(list(p), [ORIGINAL], key=i) for i, (p, _) in enumerate(groups)]
        with Engine(self.model, tok, **kw) as eng, shard.open("a") as f:
            for res in eng.generate(items, gen, progress=on_step):
                prompt, tests = groups[res.key]
                row = res.rows[0]
                response = tok.decode(row.tokens, skip_special_tokens=True)
                needle = self.needles[tests[0].needle_idx]
                span = niah.find_span(list(prompt), answers[tests[0].needle_idx])
                rouge = scoring.rouge1_recall(needle.real_needle, response)
                sc = scoring.retrieval_scores(prompt, span, row.tokens, row.argmax)  # (L, H)
                for t in tests:
                    _append(f, {"key": t.key, "needle_idx": t.needle_idx, "length": t.length, "depth": t.depth,
                                "prompt_tokens": len(prompt), "span": list(span), "response": response,
                                "rouge": rouge, "counted": scoring.counted(rouge), "tokens": row.tokens,
                                "scores": [[round(x, 6) for x in r] for r in sc.tolist()]})
                bar.update(len(tests))
        bar.close()

    def merge(self, out: Path) -> dict:
        """Combine every shard into the final files (grid order); returns the summary."""
        recs = {r["key"]: r for p in sorted(out.glob("tests-*.jsonl")) for r in read_jsonl(p)}
        missing = [t.key for t in self.tests if t.key not in recs]
        if missing:
            raise RuntimeError(f"{len(missing)} tests have no result (first: {missing[0]}); rerun with --resume")
        ordered = [recs[t.key] for t in self.tests]
        with (out / "tests.jsonl").open("w") as f:
            for r in ordered:
                f.write(json.dumps(r) + "\n")
        counted = [torch.tensor(r["scores"]) for r in ordered if r["counted"]]
        L, H = torch.tensor(ordered[0]["scores"]).shape
        ref = {head_name((l, h)): [float(c[l, h]) for c in counted] for l in range(L) for h in range(H)}
        if counted:
            (out / "head_scores.json").write_text(json.dumps(ref) + "\n")
        means = scoring.head_means(counted) if counted else torch.zeros(L, H)
        stats = score_stats({(l, h): float(means[l, h]) for l in range(L) for h in range(H)}) if counted else None
        summary = {
            "config": self.config_dict(), "tests": len(ordered), "counted": len(counted),
            "mean_rouge": sum(r["rouge"] for r in ordered) / len(ordered),
            "niah": niah_table(ordered), "mean_scores": means.tolist(),
            "stats": dict(stats.as_rows()) if stats else None,
        }
        (out / "detect.json").write_text(json.dumps(summary, indent=1) + "\n")
        from . import plots

        plots.head_heatmap(means, out / "heads.png", f"retrieval scores: {self.model_name}")
        plots.niah_heatmap(summary["niah"], out / "niah.png", f"NIAH ROUGE-1 recall: {self.model_name}")
        return summary


def niah_table(records: list[dict]) -> dict:
    """{"lengths": [...], "depths": [...], "recall": [[mean ROUGE-1 recall over needles]]} (percent)."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    acc = {}
    for r in records:
        acc.setdefault((r["length"], r["depth"]), []).append(r["rouge"])
    grid = [[sum(acc[(L, d)]) / len(acc[(L, d)]) if (L, d) in acc else None for d in depths] for L in lengths]
    return {"lengths": lengths, "depths": depths, "recall": grid}
