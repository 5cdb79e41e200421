"""NIAH construction: grid, loaders (incl. the reference layout), placement, prompt."""

import json

import pytest

from retmask import niah, synth, toy
from retmask.synth import Needle


@pytest.fixture(scope="module")
def tok():
    return toy.build_tokenizer()


def test_grid_matches_reference_linspace():
    g = niah.grid(1000, 50000, 20, 10, 3)
    assert len(g) == 600
    lengths = sorted({t.length for t in g})
    assert lengths[0] == 1000 and lengths[-1] == 50000 and len(lengths) == 20
    assert lengths[1] == 3579  # round(1000 + 49000/19)
    assert sorted({t.depth for t in g})[:3] == pytest.approx([0, 100 / 9, 200 / 9])
    with pytest.raises(ValueError, match="--min"):
        niah.grid(10, 5)


def test_synthetic_needles_are_unambiguous():
    hay = set(synth.haystack(5000, seed=3).lower().split())
    for n in synth.needles(20):
        words = n.real_needle.split()
        assert len(words) == 4 and not (set(words) & hay)
        assert n.real_needle in n.needle


def test_reference_layout_loads(tmp_path):
    (tmp_path / "needles.jsonl").write_text(
        "\n".join(json.dumps({"needle": f"N{i} is here.", "question": f"Q{i}?", "real_needle": f"here{i}"})
                  for i in range(3)))
    for i in (1, 2, 3, 10):
        (tmp_path / f"part{i}").mkdir()
        (tmp_path / f"part{i}" / "p1.txt").write_text(f"text of part {i}. ")
    ns, hs = niah.load_source(None, str(tmp_path), None)
    assert [n.question for n in ns] == ["Q0?", "Q1?", "Q2?"]
    assert hs == ["text of part 1. ", "text of part 2. ", "text of part 3. "]  # part10 sorts after part3
    with pytest.raises(ValueError, match="--needles 5"):
        niah.load_source(None, str(tmp_path), 5)


def test_bad_needles_file(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text('{"needle": "a", "question": "b"}\n')
    with pytest.raises(ValueError, match="real_needle"):
        niah.load_needles(p)
    with pytest.raises(ValueError, match="not found"):
        niah.load_needles(tmp_path / "missing.jsonl")


def _where(ctx, nd):
    for i in range(len(ctx) - len(nd) + 1):
        if ctx[i: i + len(nd)] == nd:
            return i
    raise AssertionError("needle not found")


@pytest.mark.parametrize("depth", [0, 25, 50, 90, 100])
def test_sentence_placement(tok, depth):
    hay = synth.haystack(800, seed=1)
    nd = synth.needle(4)
    ctx = niah.context_ids(tok, hay, nd, 600, depth, buffer=200)
    ndi = tok(nd.needle, add_special_tokens=False)["input_ids"]
    assert len(ctx) == 400  # length - buffer, needle included
    at = _where(ctx, ndi)
    period = tok.convert_tokens_to_ids(".")
    assert depth == 100 or at == 0 or ctx[at - 1] == period  # at a sentence end (100: appended)
    target = int((400 - len(ndi)) * depth / 100)
    assert at <= target or depth == 100
    assert target - at < 40  # the nearest sentence end, not the start


def test_faithful_placement_reproduces_the_reference_quirk(tok):
    hay = synth.haystack(800, seed=1)
    nd = synth.needle(4)
    ndi = tok(nd.needle, add_special_tokens=False)["input_ids"]
    for depth in (10, 50, 90):  # no Llama-2 period id in this vocabulary: the walk reaches 0
        assert _where(niah.context_ids(tok, hay, nd, 600, depth, placement="faithful"), ndi) == 0
    ctx = niah.context_ids(tok, hay, nd, 600, 100, placement="faithful")
    assert ctx[-len(ndi):] == ndi


def test_prompt_uses_chat_template_and_span(tok):
    nd = Needle("The secret code of the iron harbor is rho opal fig sixty .",
                "What is the secret code of the iron harbor ?", "rho opal fig sixty")
    p = niah.prompt_ids(tok, synth.haystack(300), nd, 300, 50, buffer=100)
    text = tok.decode(p)
    assert text.startswith("<|user|> <book>") and text.endswith("<|assistant|>")
    assert "based on the content of the book , question : what is the secret code" in text
    span = niah.find_span(p, tok(nd.real_needle, add_special_tokens=False)["input_ids"])
    assert tok.decode(p[span[0]: span[1]]) == "rho opal fig sixty"
