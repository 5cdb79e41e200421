"""Needle-in-a-haystack tests: needles and haystacks, the grid, needle placement and the prompt.

Follows Wu et al.'s `retrieval_head_detection.py` (see the README, "Detection"): the haystack is
repeated until long enough, cut so that context + needle = length - buffer tokens, the needle is
spliced in token space at a depth, the context is decoded and wrapped in the prompt

    <book>{context}</book>\\nBased on the content of the book, Question: {question}\\nAnswer:

which chat models receive as the user turn, with the generation prompt.

Placement `sentence` (default) walks back from the depth to the nearest sentence end found with the
model's own tokenizer. Placement `faithful` walks back to the reference's hard-coded Llama-2 period
ids (29889, 869): with other tokenizers it finds none and the needle lands at position 0 for every
depth below 100, exactly as the reference's released runs did.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import synth
from .synth import Needle

PROMPT = "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:"
LLAMA2_PERIOD_IDS = (29889, 869)
PLACEMENTS = ("sentence", "faithful")


GRID_PRESETS = {
    # Wu et al.'s README run and RetMask's released runs (lengths 0-5000)
    "wu": dict(min_len=1000, max_len=50000),
    "retmask": dict(min_len=0, max_len=5000),
    "128k": dict(min_len=4000, max_len=128000),
}


@dataclass(frozen=True)
class GridConfig:
    """A NIAH grid and how its prompts are built and answered (defaults: the reference detector's)."""

    min_len: int = 1000
    max_len: int = 50000
    n_lengths: int = 20
    n_depths: int = 10
    n_needles: int = 3
    needles: str | None = None  # JSONL; None: the built-in synthetic needles
    haystack: str | None = None  # file or folder; None: the built-in synthetic haystack
    placement: str = "sentence"
    buffer: int = 200
    steps: int = 50  # greedy decode steps per test
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    seed: int = 0

    @classmethod
    def preset(cls, name: str, **kw) -> "GridConfig":
        if name not in GRID_PRESETS:
            raise ValueError(f"preset {name!r}: use one of {sorted(GRID_PRESETS)}")
        return cls(**{**GRID_PRESETS[name], **kw})

    def check(self, source: bool = True) -> None:
        """Every setting, and with `source` the needles and haystack files read through (`load` reads them
        itself, once)."""
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r}: use one of {PLACEMENTS}")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be >= 1")
        grid(self.min_len, self.max_len, self.n_lengths, self.n_depths, self.n_needles)
        if not 0 <= self.buffer < self.max_len:
            raise ValueError(f"--buffer {self.buffer}: must lie in [0, --max {self.max_len}) (the room left below "
                             "each length; a length under it holds the needle alone)")
        for flag, path in (("--needles-file", self.needles), ("--haystack", self.haystack)):
            if path is not None and not Path(path).exists():
                raise ValueError(f"{flag} {path}: no such file or folder")
        if source and (self.needles is not None or self.haystack is not None):  # every needle's fields, every
            load_source(self.needles, self.haystack, self.n_needles, seed=self.seed)  # haystack's text: before a model

    def load(self) -> tuple[list[Needle], list[str], list["Test"]]:
        """(needles, one haystack per needle, the tests in grid order), after checking the config."""
        self.check(source=False)
        ns, hs = load_source(self.needles, self.haystack, self.n_needles, seed=self.seed)
        return ns, hs, grid(self.min_len, self.max_len, self.n_lengths, self.n_depths, len(ns))

    def unique_prompts(self, tokenizer, needles, haystacks, tests, *, progress: bool = False,
                       batch_tokens: int = 1 << 20, rank: int = 0,
                       world: int = 1) -> list[tuple[np.ndarray, list["Test"]]]:
        """Each distinct prompt (int32 token ids) with the tests that use it, in grid order of first use
        (identical prompts run once). The prompts are `prompt_ids`'s.

        Tests whose needle and cut (`_place`) agree share a prompt, found before any prompt is built;
        with `world` > 1 only every `world`-th of those prompts from `rank` on is built and returned
        (torchrun ranks each build their own share). A prompt is built once, a batch (about
        `batch_tokens` context tokens) at a time: each haystack is tokenized once, and a batch's
        prompts in one call (in parallel across cores with a fast tokenizer)."""
        from tqdm.auto import tqdm

        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world}: need 0 <= rank < world")
        chat = _use_chat(tokenizer, self.chat)
        hay_ids: dict[str, list[int]] = {}  # each haystack text tokenized once (needles may share one)
        nd_ids: dict[int, list[int]] = {}
        same: dict[tuple, list[Test]] = {}  # (needle, kept tokens, needle position) -> tests
        for t in tests:
            text = haystacks[t.needle_idx]
            if text not in hay_ids:
                hay_ids[text] = _encode(tokenizer, text)
            if t.needle_idx not in nd_ids:
                nd_ids[t.needle_idx] = _encode(tokenizer, needles[t.needle_idx].needle)
            cut = _place(tokenizer, hay_ids[text], len(nd_ids[t.needle_idx]), t.length, t.depth, self.placement,
                         self.buffer)
            same.setdefault((t.needle_idx, *cut), []).append(t)
        share = list(same.values())[rank::world]
        batches, cur, size = [], [], 0
        for ts in share:
            if cur and size + ts[0].length > batch_tokens:
                batches.append(cur)
                cur, size = [], 0
            cur.append(ts)
            size += ts[0].length
        if cur:
            batches.append(cur)
        out: dict[bytes, tuple[np.ndarray, list[Test]]] = {}  # prompt digest -> (prompt, tests)
        bar = tqdm(total=sum(map(len, share)), desc="prompts", unit="test",
                   disable=not progress or len(batches) < 2)
        for part in batches:
            firsts = [ts[0] for ts in part]
            ctxs = [splice(tokenizer, hay_ids[haystacks[t.needle_idx]], nd_ids[t.needle_idx], t.length, t.depth,
                           placement=self.placement, buffer=self.buffer) for t in firsts]
            texts = [tokenizer.decode(np.asarray(c)) for c in ctxs]  # an array converts faster than a list
            ids = _encode_prompts(tokenizer, [user_message(c, needles[t.needle_idx].question)
                                              for c, t in zip(texts, firsts)], chat)
            for ts, p in zip(part, ids):
                a = np.asarray(p, dtype=np.int32)
                key = hashlib.blake2b(a.tobytes(), digest_size=16).digest()  # not the bytes: half the memory
                out.setdefault(key, (a, []))[1].extend(ts)
                bar.update(len(ts))
        bar.close()
        return list(out.values())


@dataclass(frozen=True)
class Test:
    """One grid point: needle `needle_idx` at `depth` percent of a `length`-token context."""

    needle_idx: int
    length: int
    depth: float

    @property
    def key(self) -> str:
        return f"n{self.needle_idx}-L{self.length}-d{self.depth:g}"


def grid(min_len: int, max_len: int, n_lengths: int = 20, n_depths: int = 10, n_needles: int = 3) -> list[Test]:
    """The reference grid: lengths round(linspace(min, max, n)), depths linspace(0, 100, n)."""
    if min_len < 0 or max_len < max(min_len, 1):  # 0: RetMask's grid (a length under the buffer holds the needle alone)
        raise ValueError(f"lengths: need 0 <= --min ({min_len}) <= --max ({max_len}) and --max >= 1")
    if n_lengths < 1 or n_depths < 1 or n_needles < 1:
        raise ValueError(f"--lengths {n_lengths} / --depths {n_depths} / --needles {n_needles}: the grid needs at "
                         "least one length, one depth and one needle")
    if n_lengths == 1 and min_len != max_len:  # linspace(min, max, 1) is [min]: --max would do nothing
        raise ValueError(f"one length (--lengths 1) with --min {min_len} != --max {max_len}: give the length as "
                         "both --min and --max")
    lengths = [int(x) for x in np.round(np.linspace(min_len, max_len, n_lengths))]
    depths = [float(x) for x in np.linspace(0, 100, n_depths)]
    return [Test(i, L, d) for i in range(n_needles) for L in lengths for d in depths]


# ---------------------------------------------------------------------------------------------
# needles and haystacks


def load_needles(path: str | Path) -> list[Needle]:
    """A needles JSONL: one object per line with `needle`, `question` and `real_needle`."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"needles file {p} not found: give a JSONL with needle, question, real_needle")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in ("needle", "question", "real_needle") if not isinstance(d.get(k), str)]
        if missing:
            raise ValueError(f"{p}:{n}: missing string field(s) {missing}; each line needs needle, question, "
                             "real_needle")
        out.append(Needle(d["needle"], d["question"], d["real_needle"]))
    if not out:
        raise ValueError(f"needles file {p} is empty")
    return out


def load_haystacks(path: str | Path, n: int) -> list[str]:
    """Haystack text per needle. `path` is a text file (one haystack for all needles) or a folder in
    the reference's layout (`part1/`, `part2/`, ... one per needle, each with `*.txt` read in name
    order and joined) or a folder of `*.txt` files shared by all needles."""
    p = Path(path)
    if p.is_file():
        return [_nonempty(p.read_text(errors="replace"), p)] * n
    if not p.is_dir():
        raise ValueError(f"haystack {p} not found: give a text file or a folder of .txt files")
    parts = sorted((d for d in p.iterdir() if d.is_dir() and d.name.startswith("part")),
                   key=lambda d: int(d.name[4:]) if d.name[4:].isdigit() else 1 << 30)
    if parts:
        if len(parts) < n:
            raise ValueError(f"haystack folder {p} has {len(parts)} part folders for {n} needles")
        return [_join_txt(d) for d in parts[:n]]
    return [_join_txt(p)] * n


def _join_txt(d: Path) -> str:
    files = sorted(d.glob("*.txt"))
    if not files:
        raise ValueError(f"haystack folder {d} has no .txt files")
    return _nonempty("\n".join(f.read_text(errors="replace") for f in files), d)


def _nonempty(text: str, source: Path) -> str:
    if not text.strip():
        raise ValueError(f"haystack {source} is empty (only whitespace): give a text long enough to hide the "
                         "needle in (it is repeated up to each length)")
    return text


def synthetic_haystacks(n: int, n_words: int = 4000, seed: int = 0) -> list[str]:
    return [synth.haystack(n_words, seed=seed * 1000 + i) for i in range(n)]


def load_source(needles: str | None, haystack: str | None, n_needles: int | None, seed: int = 0):
    """Needles and one haystack per needle: from files when given, else the built-in synthetic set.
    A folder `haystack` holding `needles.jsonl` (the reference layout) supplies both."""
    if needles is None and haystack is not None and (Path(haystack) / "needles.jsonl").is_file():
        needles = str(Path(haystack) / "needles.jsonl")
    ns = load_needles(needles) if needles else synth.needles(n_needles or 3, seed=seed)
    if n_needles is not None:
        if n_needles > len(ns):
            raise ValueError(f"--needles {n_needles}: the needles file has only {len(ns)}")
        ns = ns[:n_needles]
    hs = load_haystacks(haystack, len(ns)) if haystack else synthetic_haystacks(len(ns), seed=seed)
    return ns, hs


# ---------------------------------------------------------------------------------------------
# placement and prompt


_PERIODS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _period_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that end a sentence (their text ends in . ! or ?), once per tokenizer."""
    if tokenizer not in _PERIODS:
        toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _PERIODS[tokenizer] = frozenset(
            i for i, t in enumerate(toks)
            if t is not None and t.replace("Ġ", "").replace("▁", "").replace("Ċ", "").strip()[-1:] in ".!?")
    return _PERIODS[tokenizer]


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a haystack is longer than the model's limit on purpose (it is cut to length)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def context_ids(tokenizer, haystack: str, needle: Needle, length: int, depth: float, *,
                placement: str = "sentence", buffer: int = 200) -> list[int]:
    """Token ids of the context with the needle spliced in (the reference's `insert_needle`)."""
    return splice(tokenizer, _encode(tokenizer, haystack), _encode(tokenizer, needle.needle), length, depth,
                  placement=placement, buffer=buffer)


def splice(tokenizer, hay: list[int], nd: list[int], length: int, depth: float, *,
           placement: str = "sentence", buffer: int = 200) -> list[int]:
    """`context_ids` from the haystack's and the needle's token ids."""
    n, at = _place(tokenizer, hay, len(nd), length, depth, placement, buffer)
    ctx = (hay * -(-n // len(hay)))[:n]
    return ctx[:at] + nd + ctx[at:]


def _place(tokenizer, hay: list[int], n_needle: int, length: int, depth: float, placement: str,
           buffer: int) -> tuple[int, int]:
    """Where `splice` cuts: (tokens kept of the repeated haystack, the needle's position among them).
    With the needle's and the haystack's ids these fix the context, so tests with equal cuts share a
    prompt; no context is built to find them."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: use one of {PLACEMENTS}")
    if not hay:
        raise ValueError("the haystack is empty")
    n = min(length, max(length - buffer - n_needle, 0))  # room for the needle and the buffer (the reference's rule)
    if depth >= 100:
        return n, n
    at = int(n * (depth / 100))
    periods = _period_ids(tokenizer) if placement == "sentence" else frozenset(LLAMA2_PERIOD_IDS)
    while at > 0 and hay[(at - 1) % len(hay)] not in periods:  # back to the nearest sentence end
        at -= 1
    return n, at


def user_message(context: str, question: str) -> str:
    return PROMPT.format(context=context, question=question)


def prompt_ids(tokenizer, haystack: str, needle: Needle, length: int, depth: float, *,
               placement: str = "sentence", buffer: int = 200, chat: bool | None = None) -> list[int]:
    """The full prompt of one test. Chat models (a tokenizer with a chat template) get the user turn
    and the generation prompt; Qwen3 runs with thinking off, as the reference."""
    ctx = tokenizer.decode(context_ids(tokenizer, haystack, needle, length, depth, placement=placement,
                                       buffer=buffer))
    msg = user_message(ctx, needle.question)
    if _use_chat(tokenizer, chat):
        out = tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                            tokenize=True, enable_thinking=False)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return tokenizer(msg)["input_ids"]


def _use_chat(tokenizer, chat: bool | None) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None if chat is None else chat


def _encode_prompts(tokenizer, msgs: list[str], chat: bool) -> list[list[int]]:
    """`prompt_ids`'s last step for many user messages in one tokenizer call: the chat template is
    rendered to text and tokenized without added special tokens, which is what
    `apply_chat_template(tokenize=True)` does."""
    if not chat:
        return tokenizer(msgs, verbose=False, return_attention_mask=False)["input_ids"]
    texts = tokenizer.apply_chat_template([[{"role": "user", "content": m}] for m in msgs],
                                          add_generation_prompt=True, tokenize=False, enable_thinking=False)
    return tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]


def find_span(prompt: Sequence[int], answer_ids: Sequence[int]) -> tuple[int, int]:
    """The reference's `find_needle_idx`: the first window of len(answer) whose token set overlaps
    the answer's token set by more than 90 %; (-1, -1) if none.

    Only windows holding more than 90 % as many answer tokens (counted with repeats, a bound on the
    distinct ones) can pass, so a vectorized count picks them and the set rule checks just those."""
    if len(answer_ids) == 0:
        return (-1, -1)
    want = set(int(x) for x in answer_ids)
    n = len(answer_ids)
    ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
    # windows start at every position (the last ones are cut short by the prompt's end, as in the reference)
    hits = np.concatenate([[0], np.cumsum(np.isin(ids, list(want)))])
    starts = np.arange(len(ids))
    inside = hits[np.minimum(starts + n, len(ids))] - hits[starts]
    for i in np.flatnonzero(inside / len(want) > 0.9).tolist():
        if len(set(ids[i: i + n].tolist()) & want) / len(want) > 0.9:
            return (i, i + n)
    return (-1, -1)


def niah_table(records: list[dict]) -> dict:
    """{"lengths", "depths", "recall": [[mean ROUGE-1 recall over needles]]} (percent) from records
    holding length, depth and rouge."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    acc: dict = {}
    for r in records:
        acc.setdefault((r["length"], r["depth"]), []).append(r["rouge"])
    table = [[sum(acc[(L, d)]) / len(acc[(L, d)]) if (L, d) in acc else None for d in depths] for L in lengths]
    return {"lengths": lengths, "depths": depths, "recall": table}
