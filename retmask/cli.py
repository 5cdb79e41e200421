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
    args = parser.parse_args(argv)
    if args.command in ("check-kernels", "demo"):
        from .selfcheck import run

        return run(seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
