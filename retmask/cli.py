"""The `retmask` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retmask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-kernels", help="run the kernels against their references and print a table")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("demo", help="the main job on the embedded default (for now: check-kernels)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("heads", help="score-table statistics and a head selection (HeadSet JSON)")
    p.add_argument("--scores", required=True, help="score file in the reference format {'L-H': [scores]}")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="select heads with mean score >= tau")
    sel.add_argument("--topk", type=int, help="select the k best heads")
    p.add_argument("--control", choices=["random", "non-retrieval"], help="a same-size control set instead")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="write the HeadSet JSON here")
    args = parser.parse_args(argv)
    try:
        if args.command in ("check-kernels", "demo"):
            from .selfcheck import run

            return run(seed=args.seed)
        if args.command == "heads":
            return _heads(args)
    except ValueError as e:
        print(f"retmask {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


def _heads(args) -> int:
    from pathlib import Path

    from tabulate import tabulate

    from .heads import HeadSet, load_scores, score_stats

    scores = load_scores(args.scores)
    print(tabulate(score_stats(scores).as_rows(), tablefmt="github", headers=["statistic", "value"],
                   disable_numparse=True))
    if args.tau is None and args.topk is None:
        return 0
    hs = HeadSet.from_scores(args.scores, tau=args.tau, topk=args.topk, control=args.control, seed=args.seed)
    print(f"\n{len(hs)} heads selected (lowest layer {hs.lowest_layer}): {','.join(hs.names())}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(hs.to_json())
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
