"""HeadSet: a set of query heads (`L-H`) with where it came from, and statistics of a score table.

Score files use the reference format `{"layer-head": [per-test scores, ...]}`; a head's score is the
mean of its list. A detect run's folder or its `tests.jsonl` holds each counted test's scores under
both retrieval-score rules (`scoring.RULES`); `load_score_source` reads any of the three. Selections:
threshold tau (mean >= tau), top-k, an explicit list ("15-30,24-27"), and the paper's controls of the
same size: `random` (from all heads) and `non-retrieval` (from the heads below tau, or outside the
top-k), both seeded.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

Head = tuple[int, int]  # (layer, query head)


def parse_head(text: str) -> Head:
    try:
        layer, head = text.strip().split("-")
        out = (int(layer), int(head))
    except ValueError:
        raise ValueError(f"head {text!r}: expected 'layer-head' with two integers, e.g. '15-30'") from None
    if out[0] < 0 or out[1] < 0:
        raise ValueError(f"head {text!r}: layer and head must be >= 0")
    return out


def as_head(h) -> Head:
    """A head given as 'L-H' or as a (layer, head) pair of non-negative ints."""
    if isinstance(h, str):
        return parse_head(h)
    if (isinstance(h, (tuple, list)) and len(h) == 2
            and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in h)):
        if h[0] < 0 or h[1] < 0:
            raise ValueError(f"head {tuple(h)}: layer and head must be >= 0")
        return int(h[0]), int(h[1])
    raise ValueError(f"head {h!r}: expected 'layer-head' (e.g. '15-30') or a (layer, head) pair of ints")


def head_name(h: Head) -> str:
    return f"{h[0]}-{h[1]}"


def load_scores(path: str | Path) -> dict[Head, float]:
    """Mean score per head from a reference-format JSON file."""
    path = Path(path)
    if path.is_dir():
        hint = (f"; give {path / 'head_scores.json'}" if (path / "head_scores.json").is_file()
                else "; give the head_scores.json that `retmask detect` writes")
        raise ValueError(f"scores file {path}: is a folder{hint}")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"scores file {path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"scores file {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"scores file {path}: expected a JSON object {{'layer-head': [scores, ...]}}")
    out = {}
    for k, v in raw.items():
        vals = v if isinstance(v, list) else [v]
        if not vals or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in vals):
            raise ValueError(f"scores file {path}: head {k!r} needs a non-empty list of numbers (no NaN, no booleans)")
        out[parse_head(k)] = sum(vals) / len(vals)
    return out


RULE_KEYS = {"reference": "scores", "paper": "scores_paper"}  # each rule's per-test scores in tests.jsonl


class ScoreSource(NamedTuple):
    """Mean score per head under each rule an input holds, the file they came from, and the rule its detect
    run chose (the one to use when none is asked for)."""

    file: Path
    by_rule: dict  # rule -> {head: mean score}
    rule: str

    def scores(self, rule: str | None = None) -> dict[Head, float]:
        rule = rule or self.rule
        if rule in self.by_rule:
            return self.by_rule[rule]
        if self.file.name == "tests.jsonl":
            raise ValueError(f"--score-rule {rule}: {self.file} has no {rule}-rule scores (an older retmask wrote "
                             "it); rerun `retmask detect` to record them")
        raise ValueError(f"--score-rule {rule}: {self.file} holds {self.rule}-rule scores only; pass the detect "
                         f"run's folder (or its tests.jsonl), which holds both rules")


def _run_rule(folder: Path) -> str:
    """The rule a detect run in `folder` chose (its detect.json or config.json); `reference` when neither names one."""
    for name in ("detect.json", "config.json"):
        try:
            d = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        rule = d.get("score_rule", d.get("config", {}).get("score_rule")) if isinstance(d, dict) else None
        if rule in RULE_KEYS:
            return rule
    return "reference"


def load_score_source(path: str | Path) -> ScoreSource:
    """Scores for selection from a reference-format file (its one rule: the rule its detect run names, else
    `reference`), or from a detect run's folder or `tests.jsonl` (both rules, means over the counted tests)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tests.jsonl").is_file():
            raise ValueError(f"scores folder {path}: no tests.jsonl, so not a finished `retmask detect` run (finish "
                             "it with --resume, or give a head_scores.json)")
        path = path / "tests.jsonl"
    if path.name != "tests.jsonl":
        return ScoreSource(path, {_run_rule(path.parent): load_scores(path)}, _run_rule(path.parent))
    if not path.is_file():
        raise ValueError(f"scores file {path}: not found")
    from .runs import read_jsonl

    recs = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("counted")]
    if not recs:
        raise ValueError(f"scores file {path}: no counted test (or not a `retmask detect` tests.jsonl), so no "
                         "head has a score")
    by_rule = {}
    for rule, key in RULE_KEYS.items():
        if not all(key in r for r in recs):
            continue
        per_test = [r[key] for r in recs]  # each (layers, heads)
        try:
            L, H = len(per_test[0]), len(per_test[0][0])
            by_rule[rule] = {(layer, h): _number(f"{path}: {key}", sum(t[layer][h] for t in per_test) / len(per_test))
                             for layer in range(L) for h in range(H)}
        except (TypeError, IndexError) as e:
            raise ValueError(f"scores file {path}: '{key}' is not a (layers, heads) table of numbers in every "
                             f"counted record ({e}); give the tests.jsonl that `retmask detect` writes") from None
    if not by_rule:
        raise ValueError(f"scores file {path}: its records have no per-head scores ('scores'); give a "
                         "`retmask detect` tests.jsonl")
    return ScoreSource(path, by_rule, _run_rule(path.parent))


def _number(name: str, v) -> float:
    """A real, finite number (Python or numpy; not a bool, NaN or infinite)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name}={v!r}: expected a finite number")
    return float(v)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class HeadSet:
    """Heads to switch off, sorted, with provenance (how they were chosen)."""

    heads: tuple[Head, ...]
    source: dict = field(default_factory=dict, compare=False)

    # ---- construction -------------------------------------------------------------------
    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(sorted({as_head(h) for h in self.heads})))

    @classmethod
    def from_list(cls, text: str | list[str] | list[Head]) -> "HeadSet":
        if not isinstance(text, (str, list, tuple, set, frozenset)):
            raise ValueError(f"heads: expected 'L-H,L-H' or a list of heads, got {type(text).__name__}")
        items = [t for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
        return cls(tuple(as_head(h) for h in items), {"kind": "list"})

    @classmethod
    def from_scores(cls, scores: dict[Head, float] | str | Path, *, tau: float | None = None,
                    topk: int | None = None, control: str | None = None, seed: int = 42,
                    n_layers: int | None = None, n_heads: int | None = None) -> "HeadSet":
        """Heads with mean >= tau, or the top-k; with `control`, a same-size random or
        non-retrieval set instead (seeded). `n_layers`/`n_heads` give the universe for `random`
        (default: the heads in the score table)."""
        src: dict = {}
        if isinstance(scores, (str, Path)):
            path, scores = scores, load_scores(scores)  # checks the file before it is hashed
            src = {"file": str(path), "sha256": file_sha256(path)}
        elif not isinstance(scores, dict) or not scores:
            raise ValueError("scores: expected a score file's path or a non-empty {(layer, head): mean score} dict")
        else:
            scores = {as_head(h): _number(f"scores[{h!r}]", v) for h, v in scores.items()}
        if (tau is None) == (topk is None):
            raise ValueError("give exactly one of tau (mean score >= tau) or topk (the k best heads)")
        if tau is not None and not _number("tau", tau) >= 0:
            raise ValueError(f"tau={tau}: must be >= 0 (heads with mean score >= tau are selected; a negative tau "
                             "selects every head)")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int)):
            raise ValueError(f"topk={topk!r}: expected an int (the number of heads)")
        if control is not None and control not in ("random", "non-retrieval"):
            raise ValueError(f"control={control!r}: use 'random' or 'non-retrieval'")
        ranked = sorted(scores, key=lambda h: (-scores[h], h))
        if tau is not None:
            chosen = [h for h in ranked if scores[h] >= tau]
            src.update(kind="tau", tau=tau)
        else:
            if topk < 1 or topk > len(ranked):
                raise ValueError(f"topk={topk}: must lie in [1, {len(ranked)}] (heads in the score table)")
            chosen = ranked[:topk]
            src.update(kind="topk", topk=topk)
        if not chosen:
            best = scores[ranked[0]]
            raise ValueError(f"tau={tau}: no head has a mean score >= tau (the best is {best:.4f}); lower tau")
        if control is not None:
            return cls(tuple(sorted(chosen)), src).control(scores, control, seed=seed, n_layers=n_layers,
                                                          n_heads=n_heads)
        return cls(tuple(sorted(chosen)), src)

    def control(self, scores: dict[Head, float], kind: str, *, seed: int = 42, n_layers: int | None = None,
                n_heads: int | None = None) -> "HeadSet":
        """A same-size control set (seeded): `random` from every head (the score table's, or the
        n_layers x n_heads grid), `non-retrieval` from the scored heads outside this set."""
        rng = random.Random(seed)
        if kind == "random":
            if n_layers is not None and n_heads is not None:
                pool = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
            else:
                pool = sorted(scores)
        elif kind == "non-retrieval":
            sel = set(self.heads)
            pool = sorted(h for h in scores if h not in sel)
        else:
            raise ValueError(f"control={kind!r}: use 'random' or 'non-retrieval'")
        if len(pool) < len(self):
            raise ValueError(f"control={kind}: only {len(pool)} heads to draw {len(self)} from")
        return HeadSet(tuple(sorted(rng.sample(pool, len(self)))), {**self.source, "control": kind, "seed": seed})

    # ---- use ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self):
        return iter(self.heads)

    @property
    def lowest_layer(self) -> int | None:
        return min((h[0] for h in self.heads), default=None)

    def names(self) -> list[str]:
        return [head_name(h) for h in self.heads]

    def validate(self, n_layers: int, n_heads: int) -> "HeadSet":
        for layer, h in self.heads:
            if not (0 <= layer < n_layers and 0 <= h < n_heads):
                raise ValueError(
                    f"head {layer}-{h} does not exist in this model ({n_layers} layers x {n_heads} query heads); "
                    "are the heads from another model?"
                )
        return self

    def digest(self) -> str:
        return hashlib.sha256(",".join(self.names()).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"heads": self.names(), "source": self.source, "sha": self.digest()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "HeadSet":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"HeadSet JSON: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("heads"), list):
            raise ValueError("HeadSet JSON: expected {'heads': ['L-H', ...], 'source': {...}} as to_json writes")
        return cls(tuple(parse_head(h) for h in d["heads"]), d.get("source", {}))


@dataclass(frozen=True)
class ScoreStats:
    n_heads: int
    count_at: dict  # threshold -> heads with mean >= threshold
    gini: float
    top1_share: float  # share of the total score held by the best 1 % of heads
    top5_share: float
    lowest_layer_at: dict  # threshold -> lowest layer holding a selected head

    def as_rows(self) -> list[list]:
        rows = [["heads scored", self.n_heads], ["Gini of mean scores", f"{self.gini:.3f}"],
                ["score share of top 1 % heads", f"{self.top1_share:.1%}"],
                ["score share of top 5 % heads", f"{self.top5_share:.1%}"]]
        for t, c in self.count_at.items():
            rows.append([f"heads with mean >= {t}", f"{c} (lowest layer {self.lowest_layer_at[t]})"])
        return rows


def score_stats(scores: dict[Head, float], thresholds=(0.5, 0.1, 0.05, 0.01)) -> ScoreStats:
    """Sparsity of a score table: the paper's predictor of how much RetMask helps."""
    vals = sorted(max(0.0, v) for v in scores.values())
    n, total = len(vals), sum(vals)
    # Gini = sum_i (2i - n - 1) x_i / (n sum x), x ascending, i from 1
    gini = sum((2 * i - n - 1) * x for i, x in enumerate(vals, 1)) / (n * total) if total > 0 else 0.0
    desc = vals[::-1]

    def share(frac):
        k = max(1, round(frac * n))
        return sum(desc[:k]) / total if total > 0 else 0.0

    count_at, low_at = {}, {}
    for t in thresholds:
        sel = [h for h, v in scores.items() if v >= t]
        count_at[t] = len(sel)
        low_at[t] = min((h[0] for h in sel), default=None)
    return ScoreStats(n, count_at, gini, share(0.01), share(0.05), low_at)

