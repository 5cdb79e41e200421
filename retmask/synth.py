"""Synthetic haystack text and needles, built in the package so detection, NIAH and the toy model
run offline. Everything is a deterministic function of a seed.

The haystack is simple English-like prose from a small grammar. A needle states a secret code of a
named thing; its answer is four words, one from each of four *slot* vocabularies that the haystack
never uses, so the copy from context is unambiguous:

    needle:   "The secret code of the silver harbor is sigma jade plum forty ."
    question: "What is the secret code of the silver harbor ?"
    answer:   "sigma jade plum forty"        (the reference's `real_needle`)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DETS = ["the", "a", "every", "one", "that", "this", "some", "no"]
ADJS = ["old", "young", "small", "large", "quiet", "loud", "bright", "dark", "warm", "cold", "green", "red",
        "blue", "white", "black", "happy", "sad", "tired", "quick", "slow", "gentle", "strange", "wise",
        "brave", "kind", "proud", "calm", "wild", "tall", "short", "rich", "poor", "busy", "lazy", "clever"]
NOUNS = ["man", "woman", "child", "dog", "cat", "bird", "horse", "farmer", "teacher", "king", "queen",
         "river", "forest", "village", "city", "house", "garden", "road", "mountain", "boat", "tree", "door",
         "window", "book", "letter", "song", "story", "market", "bridge", "field", "lake", "hill", "castle",
         "tower", "ship", "wind", "rain", "sun", "moon", "star", "friend", "doctor", "baker", "sailor",
         "painter", "soldier", "student", "girl", "boy", "fox", "wolf", "bear", "fish", "apple", "bread",
         "table", "chair", "lamp", "clock", "stone", "flower", "cloud", "night", "morning", "winter", "summer"]
VERBS = ["saw", "found", "liked", "watched", "followed", "carried", "painted", "visited", "remembered",
         "helped", "called", "crossed", "opened", "closed", "built", "sold", "bought", "heard", "met",
         "touched", "cleaned", "missed", "counted", "noticed", "answered", "greeted", "praised", "feared"]
IVERBS = ["slept", "waited", "laughed", "sang", "walked", "rested", "smiled", "listened", "worked", "danced",
          "ran", "stayed", "wandered", "dreamed", "returned", "arrived", "left", "spoke", "cried", "played"]
PREPS = ["near", "behind", "under", "beside", "across", "inside", "above", "around", "beyond", "toward"]
ADVS = ["slowly", "quickly", "often", "never", "always", "later", "today", "again", "quietly", "happily"]
CONJS = ["and", "but", "while", "because", "so"]

# Needle keys: "<key adjective> <key place>", words the haystack does not use either.
KEY_ADJS = ["silver", "golden", "hidden", "northern", "southern", "eastern", "western", "ancient", "frozen",
            "sunken", "crimson", "emerald", "iron", "velvet", "marble", "copper"]
KEY_NOUNS = ["harbor", "temple", "valley", "island", "palace", "library", "canyon", "lighthouse", "orchard",
             "fortress", "meadow", "glacier", "monastery", "observatory", "vineyard", "citadel"]
# Answer slots: word i of every answer comes from SLOTS[i]; no slot word occurs anywhere else.
SLOTS = [
    ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda",
     "sigma", "omega", "omicron", "upsilon", "rho"],
    ["ruby", "amber", "jade", "pearl", "topaz", "opal", "onyx", "coral", "ivory", "garnet", "quartz",
     "agate", "beryl", "cobalt", "zircon", "jasper"],
    ["mango", "lemon", "cherry", "plum", "peach", "grape", "melon", "olive", "apricot", "fig", "guava",
     "kiwi", "lime", "papaya", "quince", "banana"],
    ["eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
     "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty"],
]
NEEDLE_WORDS = ["secret", "code", "of", "is", "what"]
PUNCT = [".", ",", "?", ":"]


@dataclass(frozen=True)
class Needle:
    """One needle test item, in the reference's `needles.jsonl` fields."""

    needle: str
    question: str
    real_needle: str

    def to_dict(self) -> dict:
        return {"needle": self.needle, "question": self.question, "real_needle": self.real_needle}


def _sentence(rng: random.Random) -> str:
    def np_() -> str:
        parts = [rng.choice(DETS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(ADJS))
        parts.append(rng.choice(NOUNS))
        return " ".join(parts)

    def clause() -> str:
        r = rng.random()
        if r < 0.45:
            s = f"{np_()} {rng.choice(VERBS)} {np_()}"
        elif r < 0.8:
            s = f"{np_()} {rng.choice(IVERBS)} {rng.choice(PREPS)} {np_()}"
        else:
            s = f"{np_()} {rng.choice(IVERBS)} {rng.choice(ADVS)}"
        return s

    s = clause()
    if rng.random() < 0.35:
        s += f" , {rng.choice(CONJS)} {clause()}"
    return s[0].upper() + s[1:] + " ."


def haystack(n_words: int, seed: int = 0) -> str:
    """Synthetic prose of at least `n_words` whitespace-separated words, ending at a sentence end."""
    rng = random.Random(seed)
    out, n = [], 0
    while n < n_words:
        s = _sentence(rng)
        out.append(s)
        n += len(s.split())
    return " ".join(out)


def needle(seed: int) -> Needle:
    """The needle of index `seed`: its key and its four answer words are drawn from `seed`."""
    rng = random.Random(10_007 * seed + 17)
    key = f"{rng.choice(KEY_ADJS)} {rng.choice(KEY_NOUNS)}"
    answer = " ".join(rng.choice(slot) for slot in SLOTS)
    return Needle(needle=f"The secret code of the {key} is {answer} .",
                  question=f"What is the secret code of the {key} ?",
                  real_needle=answer)


def needles(n: int, seed: int = 0) -> list[Needle]:
    return [needle(seed * 100_003 + i) for i in range(n)]


def vocabulary() -> list[str]:
    """Every lower-case word and mark the synthetic text can contain (the toy tokenizer's words)."""
    words = DETS + ADJS + NOUNS + VERBS + IVERBS + PREPS + ADVS + CONJS + KEY_ADJS + KEY_NOUNS + NEEDLE_WORDS
    words += [w for slot in SLOTS for w in slot] + PUNCT
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
