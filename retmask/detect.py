"""Retrieval-head detection: the needle-in-a-haystack grid run on the engine, scored per head.

Each unique prompt runs once as a group of one row (the original policy): chunked prefill with no
logits, then `steps` greedy decode steps with no EOS stop, with each head's attention argmax taken
by the decode kernel. Tests with identical prompts (e.g. every depth < 100 under `faithful`
placement) are computed once and recorded once per test. Every finished test is appended to a
shard file at once (`tests-RRRRR.jsonl`, one per rank under torchrun), so a crash loses only the
tests in flight and `resume=True` continues. The merge writes:

    head_scores.json   reference format {"layer-head": [score of each counted test]}, chosen rule
    detect.json        configuration, score rule, statistics, NIAH table and the per-head mean scores
    tests.jsonl        every test in grid order (response, ROUGE, counted, per-head scores under both
                       rules: "scores" the reference rule, "scores_paper" the paper rule)
    heads.png          layer x head heatmap of the mean scores
    niah.png           length x depth heatmap of ROUGE-1 recall
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import niah, scoring
from .cache_plan import DEFAULT_BLOCK_SIZE
from .engine import (
    ORIGINAL,
    Engine,
    EngineConfig,
    GenConfig,
    Group,
    common_prefix,
    default_size,
    prefix_order,
    stats_line,
)
from .heads import RULE_KEYS, head_name, score_stats
from .runs import append_record, barrier, dist, done_keys, prepare_out, read_jsonl

PRESETS = niah.GRID_PRESETS


@dataclass(frozen=True)
class DetectConfig(niah.GridConfig):
    """A grid with the reference's defaults (50 steps), and the rule whose scores head_scores.json and
    detect.json report (`scoring.RULES`; tests.jsonl holds both)."""

    score_rule: str = "reference"

    def check(self, source: bool = True) -> None:
        if self.score_rule not in scoring.RULES:
            raise ValueError(f"score_rule={self.score_rule!r} (--score-rule): use one of {scoring.RULES}")
        super().check(source)


NAMES = ("head_scores.json", "detect.json", "tests.jsonl", "heads.png", "niah.png")


def prepare(out: str | Path, model_name: str, cfg: DetectConfig, *, resume: bool = False,
            overwrite: bool = False) -> Path:
    """Make `out` ready for a detection run (refusing an existing one unless `resume` with the same
    configuration, or `overwrite`). Cheap: call it before loading a model."""
    out = Path(out)
    prepare_out(out, {"model": model_name, **asdict(cfg)}, resume=resume, overwrite=overwrite, names=NAMES,
                unrecorded={"score_rule": "reference"})  # a run from before the rule was a setting
    return out


def prefill_flops(config, n: int, start: int = 0) -> float:
    """Forward FLOPs of prefilling tokens [start, n) after a cached prefix of `start` tokens: 2 x the
    parameters in matmuls per token, plus causal attention (QK and PV) over every earlier token."""
    c = config
    d, hq, hkv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or d // hq
    per_layer = d * hq * hd * 2 + d * hkv * hd * 2 + 3 * d * c.intermediate_size
    linear = 2 * (n - start) * c.num_hidden_layers * per_layer
    attn = 2 * 2 * c.num_hidden_layers * hq * hd * (n * n - start * start) / 2
    return linear + attn


def plan(prompts, config, reuse_prefix: int = 128, block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """What a grid's prefill costs, read from its prompts and the model's config alone: prompt tokens
    and FLOPs, with prefix reuse (prompts in `prefix_order`: each takes the whole blocks it shares with
    the one before from the prefix cache, from `reuse_prefix` tokens) and without."""
    order = prefix_order(prompts)
    pre = [0] * len(prompts)
    for a, b in zip(order, order[1:]):
        c = min(common_prefix(prompts[a], prompts[b]), len(prompts[a]) - 1, len(prompts[b]) - 1)
        c = c // block_size * block_size  # whole blocks
        pre[b] = c if reuse_prefix and c >= reuse_prefix else 0
    ns = [len(p) - 1 for p in prompts]  # the last prompt token is the first decode step's input
    return {"prompts": len(prompts), "prompt_tokens": sum(ns), "reused_tokens": sum(pre),
            "flops": sum(prefill_flops(config, n) for n in ns),
            "flops_reused": sum(prefill_flops(config, n, c) for n, c in zip(ns, pre))}


class Detector:
    """Runs a DetectConfig on a model. `engine`: the engine's settings (its max_len and, when neither
    slots nor kv_budget_gb is given, its size are the job's)."""

    def __init__(self, model, tokenizer, cfg: DetectConfig, *, model_name: str = "model",
                 engine: EngineConfig | None = None):
        self.model, self.tok, self.cfg, self.model_name = model, tokenizer, cfg, model_name
        self.engine = engine or EngineConfig()
        self.prefill = {"prompt_tokens": 0, "reused_tokens": 0}
        self.needles, self.haystacks, self.tests = cfg.load()

    def run(self, out: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
        """Run the grid's unfinished tests (this rank's share under torchrun) and merge (rank 0): returns the
        summary written to detect.json (rank 0; {} elsewhere). `self.prefill` then holds this process's
        prompt tokens computed and reused (prefix reuse), which depend on how the work was split."""
        out = prepare(out, self.model_name, self.cfg, resume=resume, overwrite=overwrite)
        rank, world = dist()
        done = done_keys(out, "tests-*.jsonl", "key")  # one set for every rank, so the split below agrees
        todo = [t for t in self.tests if t.key not in done]
        mine = self.cfg.unique_prompts(self.tok, self.needles, self.haystacks, todo, progress=progress and rank == 0,
                                       rank=rank, world=world)  # this rank's share of the prompts, built here alone
        shard = out / f"tests-{rank:05d}.jsonl"
        if mine:
            self._generate(mine, shard, progress and rank == 0)
        barrier()
        summary = self.merge(out) if rank == 0 else {}
        barrier()
        return summary

    def _generate(self, groups, shard: Path, progress: bool):
        from tqdm.auto import tqdm

        cfg, tok = self.cfg, self.tok
        longest = max(len(p) for p, _ in groups)
        ec = self.engine
        if ec.max_len is None:
            ec = replace(ec, max_len=longest + cfg.steps)
        if not ec.sized:
            ec = replace(ec, **default_size(self.model, len(groups), 4))
        gen = GenConfig(max_new_tokens=cfg.steps, eos_ids=(), return_argmax=True)
        answers = [tok(n.real_needle, add_special_tokens=False)["input_ids"] for n in self.needles]
        n_tests = sum(len(ts) for _, ts in groups)
        bar = tqdm(total=n_tests, desc="detect", unit="test", disable=not progress)
        t0, n_tok = time.perf_counter(), [0]

        def on_step(n):
            n_tok[0] += n
            bar.set_postfix_str(f"{n_tok[0] / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)

        # prompts that share a prefix (a haystack up to a needle) next to each other: the engine reuses its KV
        items = [Group(groups[i][0], [ORIGINAL], key=i) for i in prefix_order([p for p, _ in groups])]
        with Engine(self.model, tok, ec) as eng, shard.open("a") as f:
            for res in eng.generate(items, gen, progress=on_step):
                prompt, tests = groups[res.key]
                row = res.rows[0]
                response = tok.decode(row.tokens, skip_special_tokens=True)
                needle = self.needles[tests[0].needle_idx]
                span = niah.find_span(prompt, answers[tests[0].needle_idx])
                rouge = scoring.rouge1_recall(needle.real_needle, response)
                sc = scoring.retrieval_scores_by_rule(prompt, span, row.tokens, row.argmax)  # rule -> (L, H)
                by_rule = {RULE_KEYS[k]: [[round(x, 6) for x in r] for r in v.tolist()] for k, v in sc.items()}
                for t in tests:
                    append_record(f, {"key": t.key, "needle_idx": t.needle_idx, "length": t.length, "depth": t.depth,
                                "prompt_tokens": len(prompt), "span": list(span), "response": response,
                                "rouge": rouge, "counted": scoring.counted(rouge), "tokens": row.tokens, **by_rule})
                bar.update(len(tests))
            comp, reused = eng.stats["prompt_tokens"], eng.stats["reused_tokens"]
            kv = stats_line(eng.stats)
        self.prefill = {"prompt_tokens": comp, "reused_tokens": reused}
        bar.close()
        if progress and comp + reused:
            print(f"prompt tokens: {comp:,} computed, {reused:,} ({reused / (comp + reused):.0%}) reused from "
                  "the KV of prompts with the same prefix" + (" (this rank)" if dist()[1] > 1 else ""))
            print(kv)

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
        key = RULE_KEYS[self.cfg.score_rule]
        counted = [torch.tensor(r[key]) for r in ordered if r["counted"]]
        L, H = torch.tensor(ordered[0][key]).shape
        ref = {head_name((l, h)): [float(c[l, h]) for c in counted] for l in range(L) for h in range(H)}
        if counted:
            (out / "head_scores.json").write_text(json.dumps(ref) + "\n")
        means = scoring.head_means(counted) if counted else torch.zeros(L, H)
        stats = score_stats({(l, h): float(means[l, h]) for l in range(L) for h in range(H)}) if counted else None
        summary = {
            "config": {"model": self.model_name, **asdict(self.cfg)}, "score_rule": self.cfg.score_rule,
            "tests": len(ordered), "counted": len(counted),
            "mean_rouge": sum(r["rouge"] for r in ordered) / len(ordered),
            "niah": niah.niah_table(ordered), "mean_scores": means.tolist(),
            "stats": dict(stats.as_rows()) if stats else None,
        }
        (out / "detect.json").write_text(json.dumps(summary, indent=1) + "\n")
        from . import plots

        plots.head_heatmap(means, out / "heads.png",
                           f"retrieval scores ({self.cfg.score_rule} rule): {self.model_name}")
        plots.niah_heatmap(summary["niah"], out / "niah.png", f"NIAH ROUGE-1 recall: {self.model_name}")
        return summary

