"""Write the bundled synthetic instruction set (retmask/assets/instructions.jsonl): NIAH-style
questions over short synthetic books, in the generic `messages` schema. Deterministic.

    python scripts/make_instructions.py
"""

import argparse
import json
import random
from pathlib import Path

from retmask import niah, synth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "retmask/assets/instructions.jsonl"))
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.n):
        nd = synth.needle(rng.randrange(1 << 30))
        sents = synth.haystack(rng.randint(60, 260), seed=rng.randrange(1 << 30)).split(" . ")
        sents.insert(rng.randrange(len(sents) + 1), nd.needle[:-2])
        book = " . ".join(sents)
        rows.append({"id": f"synth-{i:04d}",
                     "messages": [{"role": "user", "content": niah.user_message(book, nd.question)}],
                     "answer": nd.real_needle})
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} instructions to {args.out}")


if __name__ == "__main__":
    main()
