"""Detect retrieval heads of the shipped toy model on a small NIAH grid, switch off the best ones, and
generate a few chosen/rejected pairs: the pipeline's first three steps in one script (CPU, seconds).

    python examples/detect_then_pairs.py [OUT]      # OUT: output folder (default runs/examples)

Prints the tests counted, the heads selected and the pairs written (the file and its record count)."""

import sys
from pathlib import Path

from retmask import toy
from retmask.data import load_instructions
from retmask.detect import DetectConfig, Detector
from retmask.engine import EngineConfig
from retmask.heads import HeadSet, load_scores
from retmask.pairs import PairJob, PairsConfig, load_pairs, pair_files

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples")
model, tok = toy.load()

# 1. detect: 2 lengths x 3 depths x 3 needles = 18 tests within the 512 tokens the toy was trained on, 10 greedy
#    steps each (the answer takes 5; `retmask detect` runs the reference's 50)
grid = DetectConfig(min_len=256, max_len=toy.TRAIN_LEN, n_lengths=2, n_depths=3, n_needles=3, buffer=32, steps=10)
summary = Detector(model, tok, grid, model_name="toy", engine=EngineConfig(slots=6)).run(out / "detect",
                                                                                         overwrite=True, progress=False)
print(f"detect: {summary['tests']} tests, {summary['counted']} counted")

# 2. heads: mean retrieval score >= 0.5 (what `make demo` uses on the toy)
heads = HeadSet.from_scores(load_scores(out / "detect" / "head_scores.json"), tau=0.5)
print(f"heads: {len(heads)} with score >= 0.5: {','.join(heads.names())}")

# 3. pairs: chosen from the original, rejected with those heads off, for 8 bundled instructions
ins = load_instructions(str(toy.ASSET_DIR.parent / "instructions.jsonl"), limit=8)
job = PairJob(model, tok, heads, PairsConfig(max_new_tokens=16), model_name="toy", engine=EngineConfig(slots=16))
s = job.run(ins, out / "pairs", overwrite=True, progress=False)
pairs = load_pairs(out / "pairs")
print(f"pairs: {len(pairs)} records in {pair_files(out / 'pairs')[0]} ({s['instructions']} instructions)")
print(f"first pair: chosen {pairs[0]['chosen'][0]['content']!r} / rejected {pairs[0]['rejected'][0]['content']!r}")
