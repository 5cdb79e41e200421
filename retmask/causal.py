"""The causal check (`retmask niah`): NIAH recall of the original policy and of ablated policies over
one grid, all policies as rows of one group per prompt (one batched pass, sharing the haystack KV
wherever the sharing rule allows).

Policies: the original; the selected heads; and, of the same size, the random and non-retrieval
controls; each ablation under the mask scopes asked for (`all`, `generated`). A test passes when the
ROUGE-1 recall of the answer in the response is above 50 % (the detection's counting rule).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

from . import models, niah, scoring
from .engine import ORIGINAL, Engine, EngineConfig, GenConfig, Group, Policy, default_size, prefix_order, stats_line
from .heads import HeadSet
from .prefill import layout
from .runs import append_record, barrier, dist, finished, prepare_out, read_jsonl

GridConfig = niah.GridConfig
# The command's grid when none is given: smaller than detection's, answers need few steps.
DEFAULTS = dict(min_len=1000, max_len=8000, n_lengths=5, n_depths=5, steps=32)


def make_policies(selected: HeadSet | None, scores: dict | None, controls=("random", "non-retrieval"),
                  scopes=("all", "generated"), seed: int = 42) -> list[Policy]:
    """The original plus each ablation (selected heads and controls of the same size) per scope."""
    out = [ORIGINAL]
    if selected is None or len(selected) == 0:
        return out
    sets = [("heads", selected)]
    for c in controls:
        if scores is None:
            raise ValueError(f"control {c!r} needs the score table the heads came from (--scores)")
        sets.append((c, selected.control(scores, c, seed=seed)))
    for name, hs in sets:
        for sc in scopes:
            out.append(Policy(hs, sc, f"{name}-{sc}"))
    return out


def memory_plan(config, policies: list[Policy], max_len: int, steps: int, dtype=None,
                engine: EngineConfig | None = None) -> dict:
    """The KV cache a NIAH run of `policies` needs, from the model's config alone (`cache_plan`, the
    engine's own sizing; no model is built): for one group at `max_len` (longest prompt + steps), and the
    rows and groups at once that `engine` (kv_budget_gb or slots) gives. Bytes; `per_row_bytes` is what
    the group would need if each row kept its own prompt KV. A budget too small for one group gives 0 rows
    and `refused`, the reason."""
    import torch

    from .cache_plan import group_blocks, plan_for_config, token_bytes
    from .prefill import layout

    dtype = dtype or torch.bfloat16
    L = config.num_hidden_layers
    ec = engine or EngineConfig()
    kw = {k: getattr(ec, k) for k in ("slots", "kv_budget_gb", "max_slots")}
    bs = ec.block_size
    lay = layout(policies, L, sharing=True)
    rows = len(policies)
    one = plan_for_config(config, dtype, max_len=max_len, slots=rows, prefill_tokens=ec.prefill_tokens,
                          block_size=bs)
    need = group_blocks(max_len - steps, rows, len(lay.streams), lay.base < 0 and lay.lsh > 0, steps, bs)
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tb = token_bytes(config.num_key_value_heads or config.num_attention_heads, hd, dtype)
    out = {"rows": rows, "streams": len(lay.streams), "layers": L, "shared_depth": lay.lsh,
           "segments_per_group": lay.n_segs, "block_size": bs, "group_blocks": need,
           "group_bytes": need * one.block_bytes, "per_row_bytes": tb * rows * L * max_len,
           "staging_bytes": one.staging_bytes, "slots": rows, "groups_at_once": 1, "refused": ""}
    if ec.sized:
        try:
            plan = plan_for_config(config, dtype, max_len=max_len, prefill_tokens=ec.prefill_tokens, block_size=bs,
                                   **kw)
        except ValueError as e:  # not even one block fits
            return dict(out, slots=0, groups_at_once=0, refused=str(e))
        at_once = min(plan.slots // rows, plan.usable_blocks // need)
        if at_once < 1:
            return dict(out, slots=plan.slots, groups_at_once=0,
                        refused=f"one group needs {need} KV blocks of {bs} tokens but the budget holds "
                                f"{plan.usable_blocks}; raise --kv-budget-gb")
        out.update(slots=plan.slots, groups_at_once=at_once, kv_blocks=plan.usable_blocks)
    return out


def run_config(model_name: str, grid_cfg: GridConfig, policies: list[Policy]) -> dict:
    """What a NIAH result depends on (a resumed run must match it)."""
    return {"model": model_name, "grid": dict(grid_cfg.__dict__),
            "policies": [[p.label, p.scope, p.heads.names() if p.heads is not None else []] for p in policies]}


def prepare_run(out: str | Path, model_name: str, grid_cfg: GridConfig, policies: list[Policy], *,
                resume: bool = False, overwrite: bool = False) -> Path:
    """Make `out` ready for a NIAH run (refusing an existing one unless `resume` with the same
    configuration, or `overwrite`). Cheap: call it before loading a model."""
    out = Path(out)
    prepare_out(out, json.loads(json.dumps(run_config(model_name, grid_cfg, policies))), resume=resume,
                overwrite=overwrite, names=("niah.json", "tests.jsonl"))
    return out


def run_niah(model, tok, grid_cfg: GridConfig, policies: list[Policy], *, progress: bool = True,
             out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
             model_name: str = "", engine: EngineConfig | None = None) -> dict:
    """Greedy answers of every policy on every grid test; returns {"policies": [...], "tests": [...]}.

    With `out`, each finished prompt's answers are on disk (`out/tests-RRRRR.jsonl`, one file per rank)
    as soon as they exist, and a rerun with `resume=True` computes only the prompts not there yet; an
    existing run is never silently mixed in (`resume` or `overwrite`). `model_name` (default: the
    model's own `name_or_path`) is part of the configuration a resumed run must match. Under torchrun
    (with `out`) each rank builds and answers every world-th remaining prompt; rank 0 returns the whole result
    (the other ranks return {}). `engine`: the engine's settings (max_len and, when not given, the size
    are the job's)."""
    from tqdm.auto import tqdm

    g = grid_cfg
    needles, hays, tests = g.load()
    rank, world = dist() if out is not None else (0, 1)
    records: list[dict] = []
    log = None
    if out is not None:
        model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        out = prepare_run(out, model_name, g, policies, resume=resume, overwrite=overwrite)
        log = out / f"tests-{rank:05d}.jsonl"
        if rank == 0 and (out / "tests.jsonl").is_file():  # an older retmask's single log: read as a shard
            os.replace(out / "tests.jsonl", out / "tests-legacy.jsonl")
        records = [r for rec in finished(out, "tests-*.jsonl") for r in rec["records"]]  # the same on every rank
    done = {r["key"] for r in records}
    items = g.unique_prompts(tok, needles, hays, [t for t in tests if t.key not in done],
                             progress=progress and rank == 0, rank=rank, world=world)  # this rank's share
    bar = tqdm(total=len(records) + sum(len(ts) for _, ts in items), initial=len(records), desc="niah",
               unit="test", disable=not progress or rank != 0)  # under torchrun: rank 0's share
    if items:
        ec = engine or EngineConfig()
        if ec.max_len is None:
            ec = replace(ec, max_len=max(len(p) for p, _ in items) + g.steps)
        if not ec.sized:
            ec = replace(ec, **default_size(model, len(items) * len(policies), max(4, 2 * len(policies))))
        cfg = GenConfig(max_new_tokens=g.steps, eos_ids=models.eos_ids(model, tok))
        # prompts sharing a prefix (the haystack up to the needle) next to each other: the engine reuses its KV
        groups = [Group(items[i][0], policies, key=i) for i in prefix_order([p for p, _ in items])]
        with Engine(model, tok, ec) as eng, (log.open("a") if log else contextlib.nullcontext()) as f:
            for res in eng.generate(groups, cfg):
                _, ts = items[res.key]
                nd = needles[ts[0].needle_idx]
                per = {}
                for pol, row in zip(policies, res.rows):
                    text = tok.decode(row.tokens, skip_special_tokens=True)
                    per[pol.label] = {"response": text, "rouge": scoring.rouge1_recall(nd.real_needle, text)}
                new = [{"key": t.key, "needle_idx": t.needle_idx, "length": t.length, "depth": t.depth,
                        "policies": per} for t in ts]
                if f is not None:
                    append_record(f, {"prompt": ts[0].key, "records": new})  # one line per prompt: all or none
                records += new
                bar.update(len(ts))
            comp, reused = eng.stats["prompt_tokens"], eng.stats["reused_tokens"]
            streams = len(layout(policies, eng.d.n_layers, eng.sharing).streams)  # the prompt's KV, once per stream
            kv = stats_line(eng.stats)
        bar.close()
        if progress and comp + reused:
            n_pol = len(policies)
            print(f"prompt tokens: {comp:,} computed, {reused:,} ({reused / (comp + reused):.0%}) reused from the KV "
                  f"of prompts with the same prefix; each prompt's KV held {streams} time{'s' * (streams != 1)} for "
                  f"{n_pol} polic{'ies' if n_pol != 1 else 'y'}" + (" (this rank)" if world > 1 else ""))
            print(kv)
    else:
        bar.close()
    if world > 1:
        barrier()  # every rank's answers are on disk: rank 0 gathers them
        if rank != 0:
            return {}
        by_key = {r["key"]: r for p in sorted(out.glob("tests-*.jsonl")) for rec in read_jsonl(p)
                  for r in rec["records"]}
        records = list(by_key.values())
    order = {t.key: i for i, t in enumerate(tests)}
    records.sort(key=lambda r: order[r["key"]])
    table = []
    for pol in policies:
        rs = [r["policies"][pol.label]["rouge"] for r in records]
        table.append({"policy": pol.label, "scope": pol.scope if pol.heads is not None else "-",
                      "heads": len(pol.heads) if pol.heads is not None else 0,
                      "head_list": pol.heads.names() if pol.heads is not None else [],
                      "recall": sum(rs) / len(rs), "pass_rate": 100.0 * sum(scoring.counted(x) for x in rs) / len(rs)})
    return {"config": g.__dict__, "policies": table, "tests": records}


def per_policy_table(result: dict, label: str) -> dict:
    return niah.niah_table([{"length": r["length"], "depth": r["depth"], "rouge": r["policies"][label]["rouge"]}
                            for r in result["tests"]])


def write(result: dict, out: str | Path, model_name: str) -> list[Path]:
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "niah.json").write_text(json.dumps({"model": model_name, **result}, indent=1) + "\n")
    paths = [out / "niah.json"]
    for row in result["policies"]:
        p = out / f"niah-{row['policy']}.png"
        plots.niah_heatmap(per_policy_table(result, row["policy"]), p, f"{model_name}: {row['policy']}")
        paths.append(p)
    return paths


def table_rows(result: dict) -> list[list]:
    return [[r["policy"], r["heads"], r["scope"], f"{r['recall']:.1f}", f"{r['pass_rate']:.1f}"]
            for r in result["policies"]]
