"""What each `retmask` command does with its parsed arguments (`retmask.cli` builds the parser): the
checks that run before any model loads, then the job."""

from __future__ import annotations

import os


def _grid_kw(args, defaults: dict) -> dict:
    kw = dict(defaults)
    for k in ("min_len", "max_len", "n_lengths", "n_depths", "n_needles"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    kw.update(needles=args.needles_file, haystack=args.haystack, placement=args.placement, steps=args.steps,
              seed=args.seed)
    if args.buffer is not None:
        kw["buffer"] = args.buffer
    if kw.get("n_needles") is None:
        kw.pop("n_needles", None)
    return kw


def _dist_init(device: str | None = None) -> str | None:
    """Join the torchrun process group when launched by torchrun; returns the device to use: `device`
    (--device) when it names one, else the local rank's GPU (or the CPU without one). None outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not dist.is_initialized():
        # Ranks meet at barriers only after generating their whole shard, which can end hours apart
        # on a long job: NCCL's default 10-minute timeout would tear down the ranks that finish first.
        hours = float(os.environ.get("RETMASK_DIST_TIMEOUT_HOURS", "48"))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=hours))
    if not cuda:
        return device or "cpu"
    if device in (None, "cuda"):  # modulo: a launcher may show each process only its own GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    return device


def _engine_config(args):
    """The engine settings the flags give, as an `EngineConfig` (the jobs fill in max_len and, when
    neither --slots nor --kv-budget-gb is given, the size)."""
    from .engine_config import EngineConfig

    for flag, v in (("--slots", args.slots), ("--chunk", args.chunk), ("--prefill-tokens", args.prefill_tokens),
                    ("--admit-rows", args.admit_rows)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1")
    if args.kv_budget_gb is not None and not args.kv_budget_gb > 0:
        raise ValueError(f"--kv-budget-gb {args.kv_budget_gb:g}: must be > 0")
    if args.reuse_prefix < 0:
        raise ValueError(f"--reuse-prefix {args.reuse_prefix}: must be >= 0 (0 turns prefix reuse off)")
    return EngineConfig(slots=args.slots, kv_budget_gb=args.kv_budget_gb, chunk=args.chunk, decode=args.decode,
                        prefill_tokens=args.prefill_tokens, reuse_prefix=args.reuse_prefix, admit_rows=args.admit_rows)


def _check_model_args(args, *models_):
    """Everything about the model arguments that can fail, checked before any work: the device, RETMASK_BACKEND,
    the engine sizes, and each model's folder or hub name, architecture (from its config) and tokenizer files.
    Returns the engine settings (`EngineConfig`)."""
    from . import models
    from .kernels import backend_choice

    models.check_device(args.device)
    backend_choice()  # RETMASK_BACKEND
    engine = _engine_config(args)
    for m in models_ or (args.model,):
        models.config(m)
        models.check_tokenizer(m)
    return engine


def _check_model(args) -> None:
    """The model first: a missing or unusable model is the mistake to name before any grid setting."""
    from . import models

    models.config(args.model)
    models.check_tokenizer(args.model)


def _warn_past_context(model: str, grid) -> None:
    """One line on stderr when the grid's longest prompt and its decode steps run past the positions the
    model was trained for: such tests measure extrapolation, and take long, without failing."""
    import sys

    from . import models, toy

    need = grid.max_len + grid.steps
    limit = models.context_len(models.config(model))
    if limit and need > limit:
        print(f"warning: --max {grid.max_len} + {grid.steps} decode steps runs past the model's "
              f"max_position_embeddings {limit}; lower --max to stay within what it was trained for",
              file=sys.stderr)
    elif model == toy.NAME and grid.max_len > toy.TRAIN_LEN:
        print(f"warning: --max {grid.max_len} is past the {toy.TRAIN_LEN} tokens the toy model was trained on (its "
              f"max_position_embeddings is {limit}); expect it to miss the needle there", file=sys.stderr)


def _default_len(args) -> dict:
    from . import toy

    if args.model == toy.NAME:  # the toy model's training length
        return dict(min_len=128, max_len=toy.TRAIN_LEN, n_lengths=4, n_depths=5, buffer=32)
    return {}


def run_detect(args) -> int:
    from pathlib import Path

    from tabulate import tabulate

    from . import models
    from .detect import DetectConfig, Detector, prepare

    _check_model(args)
    base = _default_len(args)
    if args.preset:
        from .detect import PRESETS

        base.update(PRESETS[args.preset])
    cfg = DetectConfig(**_grid_kw(args, base), score_rule=args.score_rule)
    cfg.check()
    _warn_past_context(args.model, cfg)
    if args.plan:
        return _detect_plan(args, cfg)
    engine = _check_model_args(args)
    out = Path(args.out or f"runs/detect/{models.display_name(args.model)}")
    device = _dist_init(args.device) or args.device
    prepare(out, args.model, cfg, resume=args.resume, overwrite=args.overwrite)  # before the model loads
    model, tok = models.load(args.model, dtype=args.dtype, device=device)
    det = Detector(model, tok, cfg, model_name=args.model, engine=engine)
    summary = det.run(out, resume=True, progress=not args.no_progress)
    if summary:
        print(f"{summary['tests']} tests, {summary['counted']} counted (ROUGE-1 recall > 50), "
              f"mean recall {summary['mean_rouge']:.1f}; head scores by the {cfg.score_rule} rule")
        if summary["stats"]:
            print(tabulate(list(summary["stats"].items()), tablefmt="github", headers=["statistic", "value"],
                           disable_numparse=True))
            print(f"wrote {out}/head_scores.json, detect.json, tests.jsonl, heads.png, niah.png")
        else:
            print(f"no test counted, so no head has a score and {out}/head_scores.json is not written (a test counts "
                  "when the answer's ROUGE-1 recall of the needle is above 50: check the needles, the lengths and "
                  "the model's answers in tests.jsonl)")
            print(f"wrote {out}/detect.json, tests.jsonl, heads.png, niah.png")
    return 0


def _detect_plan(args, cfg) -> int:
    """`retmask detect --plan`: the grid's prompts and prefill cost, without loading weights."""
    from tabulate import tabulate

    from . import models
    from .detect import plan

    if args.tflops is not None and not args.tflops > 0:
        raise ValueError(f"--tflops {args.tflops:g}: must be > 0")
    _engine_config(args)  # the engine flags, --reuse-prefix among them
    config, tok = models.config(args.model), models.tokenizer(args.model)
    needles, hays, tests = cfg.load()
    prompts = [p for p, _ in cfg.unique_prompts(tok, needles, hays, tests, progress=not args.no_progress)]
    r = plan(prompts, config, args.reuse_prefix)
    def flops(f):
        unit = next((u for u in ((1e15, "PFLOP"), (1e12, "TFLOP")) if f >= u[0]), (1e9, "GFLOP"))
        at = f" ({f / (args.tflops * 1e12) / 3600:.2f} h at {args.tflops:g} TFLOP/s)" if args.tflops else ""
        return f"{f / unit[0]:,.1f} {unit[1]}{at}"

    rows = [("tests / distinct prompts", f"{len(tests)} / {r['prompts']}"),
            ("prompt tokens (longest)", f"{r['prompt_tokens']:,} ({max(len(p) for p in prompts):,})"),
            ("reused by prefix (one slot)", f"{r['reused_tokens']:,} ({r['reused_tokens'] / r['prompt_tokens']:.0%})"),
            ("prefill, no reuse", flops(r["flops"])),
            ("prefill, prefix reuse", flops(r["flops_reused"]))]
    print(tabulate(rows, headers=[f"plan: {args.model}", ""], tablefmt="github", disable_numparse=True))
    print(f"each test then decodes {cfg.steps} steps; under torchrun a rank runs every world-th prompt (less reuse)")
    return 0


def _niah_plan(args, grid, policies, engine) -> int:
    """`retmask niah --plan`: the cache a group of the policies needs at the grid's longest prompt, and what
    a budget holds, by the engine's own sizing over the model's config (no weights load)."""
    from tabulate import tabulate

    from . import causal, models

    config, tok = models.config(args.model), models.tokenizer(args.model)
    needles, hays, tests = grid.load()
    top = max(t.length for t in tests)  # the longest prompts come from the longest length: build only those
    longest = max(len(p) for p, _ in grid.unique_prompts(tok, needles, hays, [t for t in tests if t.length == top]))
    dtype = models.run_dtype(args.dtype, args.device or models.default_device())  # as the run itself loads
    r = causal.memory_plan(config, policies, longest + grid.steps, grid.steps, dtype=dtype, engine=engine)
    gb = lambda b: f"{b / 1e9:,.1f} GB" if b >= 1e9 else f"{b / 1e6:,.2f} MB"  # noqa: E731
    rows = [("policies (rows) / prefill streams", f"{r['rows']} / {r['streams']}"),
            ("longest prompt + steps", f"{longest:,} + {grid.steps}"),
            ("shared depth / prompt block sets per group", f"{r['shared_depth']} of {r['layers']} layers / "
                                                            f"{r['segments_per_group']}"),
            ("KV cache per group", f"{gb(r['group_bytes'])} ({r['group_blocks']:,} blocks of {r['block_size']})"),
            ("same, each row its own prompt KV", gb(r["per_row_bytes"])),
            ("staging of one prefill pass", gb(r["staging_bytes"]))]
    if engine.kv_budget_gb is not None:
        rows.append((f"with --kv-budget-gb {engine.kv_budget_gb:g}",
                     f"{r.get('kv_blocks', 0):,} blocks, {r['groups_at_once']} group(s) at once"
                     if not r["refused"] else
                     "not one group fits"))
    print(tabulate(rows, headers=[f"niah plan: {args.model} ({str(dtype).removeprefix('torch.')})", ""],
                   tablefmt="github", disable_numparse=True))
    if engine.kv_budget_gb is None:
        print("give --kv-budget-gb to see how many groups a budget holds at once")
    elif r["refused"]:
        print(r["refused"])
        return 1
    return 0


def run_niah(args) -> int:
    from pathlib import Path

    from tabulate import tabulate

    from . import causal, models
    from .heads import load_scores

    _check_model(args)
    grid = causal.GridConfig(**_grid_kw(args, {**causal.DEFAULTS, **_default_len(args)}))
    grid.check()
    _warn_past_context(args.model, grid)
    engine = _check_model_args(args)
    scores = load_scores(args.scores) if args.scores else None
    selected = _select_heads(args, args.scores)
    if selected is None and (args.scores or args.controls):
        raise ValueError("--scores/--controls need heads to switch off: give --tau or --topk (with --scores) or "
                         "--heads")
    models.check_heads(args.model, selected)
    controls = []
    if selected is not None:
        default = "random,non-retrieval" if scores is not None else "random"
        controls = [c.strip() for c in (default if args.controls is None else args.controls).split(",") if c.strip()]
        for c in controls:
            if c not in ("random", "non-retrieval"):
                raise ValueError(f"--controls: unknown control {c!r}; use random and/or non-retrieval")
        if scores is None and "non-retrieval" in controls:
            raise ValueError("--controls non-retrieval needs the score table the heads came from (--scores)")
        if scores is None and controls:  # `random` draws from every head of the model
            c = models.config(args.model)
            scores = {(l, h): 0.0 for l in range(c.num_hidden_layers) for h in range(c.num_attention_heads)}
    scopes = [c for c in args.scopes.split(",") if c.strip()]
    policies = causal.make_policies(selected, scores, controls=controls, scopes=scopes)
    for p in policies:
        models.check_heads(args.model, p.heads)
    if args.plan:
        return _niah_plan(args, grid, policies, engine)
    out = Path(args.out or f"runs/niah/{models.display_name(args.model)}")
    device = _dist_init(args.device) or args.device  # under torchrun: every rank takes a share of the prompts
    # refuse an existing run (or an unwritable folder) before loading the model
    causal.prepare_run(out, args.model, grid, policies, resume=args.resume, overwrite=args.overwrite)
    model, tok = models.load(args.model, dtype=args.dtype, device=device)
    res = causal.run_niah(model, tok, grid, policies, progress=not args.no_progress, out=out, resume=True,
                          model_name=args.model, engine=engine)
    if not res:  # not rank 0: it reports
        return 0
    print(tabulate(causal.table_rows(res), tablefmt="github",
                   headers=["policy", "heads off", "scope", "ROUGE-1 recall %", "pass %"], disable_numparse=True))
    print("ROUGE-1 recall %: the mean over the tests of the needle's ROUGE-1 recall in the answer; pass %: the share "
          "of tests whose recall is above 50 (those detect counts)")
    paths = causal.write(res, out, args.model)
    print(f"wrote {paths[0]} and {len(paths) - 1} heatmaps")
    return 0


def _select_heads(args, scores_path):
    from .heads import HeadSet

    if args.heads is not None:
        hs = HeadSet.from_list(args.heads)
        if not len(hs):
            raise ValueError(f"--heads {args.heads!r}: give at least one head, e.g. '15-30,24-27'")
        return hs
    if args.tau is None and args.topk is None:
        return None
    _check_tau(args.tau)
    if not scores_path:
        raise ValueError("--tau/--topk need --scores (a head score file from `retmask detect`)")
    return HeadSet.from_scores(scores_path, tau=args.tau, topk=args.topk, control=getattr(args, "control", None),
                               seed=args.seed)


def _check_tau(tau) -> None:
    if tau is not None and not tau >= 0:
        raise ValueError(f"--tau {tau:g}: must be >= 0 (heads with mean score >= tau are selected; a negative tau "
                         "selects every head)")


def run_pairs(args) -> int:
    from pathlib import Path

    from . import models, runs, toy
    from .data import load_instructions
    from .engine import stats_line
    from .pairs import PairJob, PairsConfig, check_context, check_edges, prepare

    if args.control and args.tau is None and args.topk is None:
        raise ValueError(f"--control {args.control}: a control is drawn the size of a selection; give --scores "
                         "with --tau or --topk")
    hs = _select_heads(args, args.scores)
    if hs is None and not args.reject_model:
        raise ValueError("give the heads to switch off (--scores with --tau/--topk, or --heads) or --reject-model")
    engine = _check_model_args(args, args.model, *([args.reject_model] if args.reject_model else []))
    out = Path(args.out or f"runs/pairs/{models.display_name(args.model)}")
    kw = {"temperature": args.temperature, "top_p": args.top_p, "scope": args.mask_scope, "seed": args.seed}
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.max_prompt_tokens is not None:
        kw["max_prompt_tokens"] = args.max_prompt_tokens
    if args.thinking:
        kw["thinking"] = args.thinking == "on"
    cfg = PairsConfig.paper(args.model, **kw)
    for m in (args.model, *([args.reject_model] if args.reject_model else [])):
        check_context(cfg, models.config(m), m)  # from the config alone: before any weights load
    try:
        edges = [int(x) for x in args.length_buckets.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--length-buckets {args.length_buckets!r}: give token counts, e.g. '512' or "
                         "'256,1024' ('' for none)") from None
    edges = check_edges(edges, f"--length-buckets {args.length_buckets!r}")
    models.check_heads(args.model, hs)
    runs.check_writable(out)
    data = args.data or str(toy.ASSET_DIR.parent / "instructions.jsonl")
    ins = load_instructions(data, split=args.split, start=args.start, end=args.end, limit=args.limit)
    if int(os.environ.get("RANK", "0")) == 0:  # one process speaks
        print(f"{len(ins.items)} instructions from {data} (schema {ins.schema!r}); skipped "
              f"{dict(ins.skipped) or 'none'}")
    device = _dist_init(args.device) or args.device
    prepare(out, ins.items, cfg, args.model, hs, args.reject_model, resume=args.resume,
            overwrite=args.overwrite)  # refuse an existing run before the model loads
    model, tok = models.load(args.model, dtype=args.dtype, device=device)
    reject = models.load(args.reject_model, dtype=args.dtype, device=device) if args.reject_model else None
    job = PairJob(model, tok, hs, cfg, model_name=args.model, reject=reject, reject_name=args.reject_model,
                  length_buckets=edges, engine=engine)
    s = job.run(ins, out, resume=True, progress=not args.no_progress)
    if s:
        print(f"{s['pairs']} pairs kept of {s['instructions']}; dropped {s['dropped'] or 'none'}; "
              f"{s['generated_tokens']} tokens generated" +
              (f", {s['tokens_per_s']} tok/s this run" if s["tokens_per_s"] else "") +
              (f", decode slots {100 * s['slot_utilization']:.0f} % busy" if s.get("slot_utilization") else "") +
              (f", {s['prefill_passes']} prefill passes in {s['decode_steps']} decode steps" +
               (" (summed over ranks)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
               if s.get("decode_steps") else "") +
              (f", {s['prompt_tokens_reused']} prompt tokens reused from shared prefixes"
               if s.get("prompt_tokens_reused") else ""))
        if s.get("kv_blocks_total"):
            print(stats_line(s))
        sh = s["shards"]
        print(f"wrote {out}/{sh[0]}" + (f" to {sh[-1]} ({len(sh)} shards)" if len(sh) > 1 else "") +
              f" and {out}/summary.json")
    return 0


def run_train(args) -> int:
    from pathlib import Path

    from . import models, toy
    from .train import TrainConfig, train

    path = str(toy.ASSET_DIR) if args.model == toy.NAME else args.model
    preset = args.preset or ("toy" if args.model == toy.NAME else "paper")
    given = {"max_length": args.max_length, "learning_rate": args.lr, "epochs": args.epochs,
             "effective_batch": args.effective_batch, "per_device_batch": args.per_device_batch}
    over = {k: v for k, v in given.items() if v is not None}
    cfg = TrainConfig.preset(preset, lora=args.lora, precompute_ref=args.precompute_ref, liger=args.liger, **over)
    from .pairs import pair_files

    pair_files(args.pairs)  # fails early with a clear message when there are none
    if args.model != toy.NAME:
        models.check_trainable(args.model)  # a folder without a model or tokenizer, an unreachable hub name
    out = Path(args.out or f"runs/train/{models.display_name(args.model)}")
    res = train(path, args.pairs, out, cfg, resume=args.resume, overwrite=args.overwrite)
    if "metrics" not in res:  # not the main process (accelerate launch): rank 0 reports
        return 0
    m = res["metrics"]
    if m:
        nan = float("nan")
        print(f"final loss {m.get('loss', nan):.4f}, reward margin {m.get('rewards/margins', nan):.4f}")
    print(f"wrote {res['final']} (loads with transformers' from_pretrained)")
    return 0


def run_heads(args) -> int:
    from pathlib import Path

    from tabulate import tabulate

    from .heads import HeadSet, file_sha256, load_score_source, score_stats

    _check_tau(args.tau)
    if args.tau is None and args.topk is None and (args.control or args.out):
        raise ValueError(f"{'--control' if args.control else '--out'} needs a selection: give --tau or --topk")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give the HeadSet JSON file to write, e.g. "
                         f"{Path(args.out) / 'heads.json'}")
    src = load_score_source(args.scores)
    rule = args.score_rule or src.rule
    scores = src.scores(rule)
    hs = None
    if args.tau is not None or args.topk is not None:  # a selection that fails does so before the table
        hs = HeadSet.from_scores(scores, tau=args.tau, topk=args.topk, control=args.control, seed=args.seed)
        hs = HeadSet(hs.heads, {"file": str(src.file), "sha256": file_sha256(src.file), "score_rule": rule,
                                **hs.source})
    print(f"{rule}-rule scores from {src.file}")
    print(tabulate(score_stats(scores).as_rows(), tablefmt="github", headers=["statistic", "value"],
                   disable_numparse=True))
    if args.tau is not None and len(src.by_rule) > 1:
        ref, pap = ({h for h, v in src.by_rule[r].items() if v >= args.tau} for r in ("reference", "paper"))
        union = ref | pap
        jac = f"{len(ref & pap) / len(union):.2f}" if union else "-"
        print(f"\ntau {args.tau:g}: reference {len(ref)} heads, paper {len(pap)} heads, {len(ref & pap)} in both "
              f"(Jaccard {jac})")
    if hs is None:
        return 0
    print(f"\n{len(hs)} heads selected (lowest layer {hs.lowest_layer}): {','.join(hs.names())}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(hs.to_json())
        print(f"wrote {args.out}")
    return 0
