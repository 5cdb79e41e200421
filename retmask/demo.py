"""`make demo`: the whole RetMask pipeline on the shipped toy model, on CPU, in about 20 seconds.

detect heads -> pairs from the bundled synthetic instructions -> a short DPO run -> NIAH before and
after; one summary table; files and plots under `runs/demo/`. The same steps on a GPU model:

    retmask detect --model meta-llama/Llama-3.1-8B-Instruct --preset retmask
    retmask pairs  --model meta-llama/Llama-3.1-8B-Instruct --scores runs/detect/.../head_scores.json --tau 0.1 \\
                   --data lmsys/lmsys-chat-1m
    retmask train  --model meta-llama/Llama-3.1-8B-Instruct --pairs runs/pairs/... --max-length 4096
    retmask niah   --model runs/train/.../final
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# what a demo writes in its folder: a rerun replaces these, and refuses a folder that holds anything else
DEMO_ENTRIES = frozenset({"detect", "pairs", "train", "niah-before", "niah-after", "summary.json"})


def clear_out(out: Path) -> None:
    """Empty `out` for a fresh demo: only a folder that holds nothing but an earlier demo's files is
    deleted, so `--out .` (or any folder with other files) is refused rather than wiped."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the demo's files")
    other = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
    if other:
        raise ValueError(f"--out {out} holds files an earlier demo did not write ({', '.join(other[:5])}"
                         f"{', ...' if len(other) > 5 else ''}); give a new or empty folder")
    shutil.rmtree(out)


def run(out: str | Path = "runs/demo", *, seed: int = 0, model_dir: str | Path | None = None,
        n_instructions: int = 64) -> int:
    import torch
    from tabulate import tabulate

    from . import causal, toy
    from .data import load_instructions
    from .detect import DetectConfig, Detector
    from .engine import EngineConfig
    from .heads import HeadSet, load_scores, score_stats
    from .pairs import PairJob, PairsConfig
    from .train import TrainConfig, train

    out = Path(out)
    clear_out(out)
    torch.manual_seed(seed)
    model_dir = Path(model_dir or toy.ASSET_DIR)
    t_all = time.perf_counter()
    rows = []

    def step(msg):
        print(f"\n== {msg}", flush=True)

    step("1/4 detect retrieval heads (NIAH grid on the toy model)")
    model, tok = toy.load(model_dir)
    cfg = DetectConfig(min_len=128, max_len=toy.TRAIN_LEN, n_lengths=4, n_depths=5, n_needles=3, buffer=32,
                       steps=50, seed=seed)
    s = Detector(model, tok, cfg, model_name="toy", engine=EngineConfig(slots=8)).run(out / "detect")
    scores = load_scores(out / "detect" / "head_scores.json")
    heads = HeadSet.from_scores(scores, tau=0.5)
    st = score_stats(scores)
    rows += [["detection tests (counted)", f"{s['tests']} ({s['counted']})"],
             ["heads with score >= 0.5", f"{len(heads)}: {','.join(heads.names())}"],
             ["score Gini / share of the top 1 % heads", f"{st.gini:.3f} / {st.top1_share:.3f}"]]

    step("2/4 preference pairs: original (chosen) vs heads off (rejected), one batched pass")
    ins = load_instructions(str(toy.ASSET_DIR.parent / "instructions.jsonl"), limit=n_instructions)
    model, tok = toy.load(model_dir)
    job = PairJob(model, tok, heads, PairsConfig(max_new_tokens=16, seed=seed), model_name="toy",
                  engine=EngineConfig(slots=16))
    ps = job.run(ins, out / "pairs")
    rows += [["pairs kept / instructions", f"{ps['pairs']} / {ps['instructions']}"],
             ["pairs dropped", json.dumps(ps["dropped"]) if ps["dropped"] else "none"]]

    step("3/4 DPO (TRL DPOTrainer, reference = the original toy model)")
    res = train(str(model_dir), out / "pairs", out / "train", TrainConfig.preset("toy", seed=seed), quiet=True)
    m, f = res.get("metrics", {}), res.get("first", {})
    rows += [["DPO loss first -> last", f"{f.get('loss', float('nan')):.4f} -> {m.get('loss', float('nan')):.4f}"],
             ["DPO reward margin first -> last",
              f"{f.get('rewards/margins', float('nan')):.4f} -> {m.get('rewards/margins', float('nan')):.4f}"]]

    step("4/4 NIAH before and after, and the causal check on the trained model")
    grid = causal.GridConfig(min_len=128, max_len=toy.TRAIN_LEN, n_lengths=4, n_depths=5, n_needles=3, buffer=32,
                             steps=16, seed=seed + 1)
    before_m, tok = toy.load(model_dir)
    pols = causal.make_policies(heads, scores, controls=("non-retrieval",), scopes=("all",))
    niah_engine = EngineConfig(slots=12)
    before = causal.run_niah(before_m, tok, grid, pols, engine=niah_engine, out=out / "niah-before", model_name="toy")
    causal.write(before, out / "niah-before", "toy")
    after_m, tok = toy.load(res["final"])
    after = causal.run_niah(after_m, tok, grid, pols, engine=niah_engine, out=out / "niah-after",
                            model_name="toy + DPO")
    causal.write(after, out / "niah-after", "toy + DPO")
    for b, a in zip(before["policies"], after["policies"]):
        rows.append([f"NIAH recall %, {b['policy']}", f"{b['recall']:.1f} -> {a['recall']:.1f}"])
    rows.append(["wall time", f"{time.perf_counter() - t_all:.0f} s"])
    print()
    print(tabulate(rows, headers=["demo (toy model, CPU)", "result"], tablefmt="github", disable_numparse=True))
    (out / "summary.json").write_text(json.dumps(dict(rows), indent=1) + "\n")
    print(f"\nfiles and plots under {out}/")
    return 0
