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


def test_retmask_grid_starts_at_length_zero(tok):
    """RetMask's grid runs lengths 0-5000 with the 200-token buffer: a length under the buffer holds the needle
    alone. The buffer must leave room below the longest length."""
    g = niah.GridConfig.preset("retmask")
    g.check()
    tests = niah.grid(g.min_len, g.max_len, g.n_lengths, g.n_depths, g.n_needles)
    assert sorted({t.length for t in tests})[:2] == [0, 263]  # round(5000 / 19)
    nd = synth.needle(4)
    ndi = tok(nd.needle, add_special_tokens=False)["input_ids"]
    for length in (0, 150):
        assert niah.context_ids(tok, synth.haystack(800, seed=1), nd, length, 50, buffer=200) == ndi
    for buffer in (-1, 5000):
        with pytest.raises(ValueError, match=f"--buffer {buffer}"):
            niah.GridConfig.preset("retmask", buffer=buffer).check()
    with pytest.raises(ValueError, match="--min"):
        niah.grid(-1, 10)


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


def _bpe_tokenizer(text: str):
    """A byte-level BPE tokenizer (the Llama-3 / Qwen kind) trained here, with a BOS it adds itself
    and a chat template that writes special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", model_max_length=256)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return tok


@pytest.mark.parametrize("kind", ["toy", "bpe"])
@pytest.mark.parametrize("chat", [None, False])
@pytest.mark.parametrize("placement", ["sentence", "faithful"])
def test_unique_prompts_are_prompt_ids_deduplicated(tok, kind, chat, placement):
    """The batched prompt builder gives each test exactly `prompt_ids`'s prompt (the per-test path),
    across batch boundaries, with identical prompts merged in grid order of first use."""
    needles = synth.needles(2, seed=5)
    hays = [synth.haystack(500, seed=7), synth.haystack(500, seed=8)]
    if kind == "bpe":
        tok = _bpe_tokenizer(" ".join(hays) + " " + " ".join(n.needle + " " + n.question for n in needles))
    g = niah.GridConfig(min_len=150, max_len=400, n_lengths=3, n_depths=4, n_needles=2, placement=placement,
                        buffer=40, chat=chat)
    tests = niah.grid(g.min_len, g.max_len, g.n_lengths, g.n_depths, g.n_needles)
    items = g.unique_prompts(tok, needles, hays, tests, batch_tokens=700)  # several tests per batch, several batches
    assert sorted(t.key for _, ts in items for t in ts) == sorted(t.key for t in tests)
    assert len({p.tobytes() for p, _ in items}) == len(items)
    assert [ts[0] for _, ts in items] == [t for t in tests if any(t is ts[0] for _, ts in items)]
    for p, ts in items:
        for t in ts:
            want = niah.prompt_ids(tok, hays[t.needle_idx], needles[t.needle_idx], t.length, t.depth,
                                   placement=placement, buffer=40, chat=chat)
            assert p.tolist() == want, t.key
    has_chat = chat is None  # both tokenizers have a template
    first = items[0][0].tolist()
    assert (first[0] == tok.bos_token_id) if kind == "bpe" else True  # the BOS: from the template or the tokenizer
    assert ("assistant" in tok.decode(first[-8:])) == has_chat
    if placement == "faithful":  # every depth < 100 puts the needle at 0: those prompts merge
        assert len(items) == len(tests) // g.n_depths * 2


@pytest.mark.parametrize("placement", ["sentence", "faithful"])
def test_unique_prompts_build_each_prompt_once_and_only_the_ranks_share(tok, placement, monkeypatch):
    """Tests that share a prompt are found before any prompt is built: one prompt is built per distinct
    prompt, and under torchrun a rank builds only its every-world-th share of the single process's list."""
    needles = synth.needles(2, seed=5)
    hays = [synth.haystack(500, seed=7), synth.haystack(500, seed=8)]
    g = niah.GridConfig(min_len=150, max_len=400, n_lengths=3, n_depths=4, n_needles=2, placement=placement,
                        buffer=40)
    tests = niah.grid(g.min_len, g.max_len, g.n_lengths, g.n_depths, g.n_needles)
    built = []
    real = niah._encode_prompts
    monkeypatch.setattr(niah, "_encode_prompts", lambda tk, msgs, chat: built.extend(msgs) or real(tk, msgs, chat))
    whole = g.unique_prompts(tok, needles, hays, tests, batch_tokens=700)
    assert len(built) == len(whole) < len(tests) + (placement == "sentence")  # faithful: far fewer than tests
    for world in (2, 3):
        built.clear()
        shares = [g.unique_prompts(tok, needles, hays, tests, batch_tokens=700, rank=r, world=world)
                  for r in range(world)]
        assert len(built) == len(whole)  # every prompt built once over all ranks
        for r, share in enumerate(shares):
            want = whole[r::world]
            assert [p.tolist() for p, _ in share] == [p.tolist() for p, _ in want]
            assert [[t.key for t in ts] for _, ts in share] == [[t.key for t in ts] for _, ts in want]
    with pytest.raises(ValueError, match="rank 2 of world 2"):
        g.unique_prompts(tok, needles, hays, tests, rank=2, world=2)


def test_find_span_matches_the_reference_rule():
    """The vectorized search against the reference's loop, on random prompts with many near-misses
    and windows cut short by the prompt's end."""
    import random

    def loop(prompt, answer):
        want = set(answer)
        for i in range(len(prompt)):
            if len(set(prompt[i: i + len(answer)]) & want) / len(want) > 0.9:
                return (i, i + len(answer))
        return (-1, -1)

    rng = random.Random(0)
    found = 0
    for _ in range(2000):
        vocab = rng.choice([3, 6, 12, 40])
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 50))]
        answer = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        assert niah.find_span(prompt, answer) == loop(prompt, answer), (prompt, answer)
        found += loop(prompt, answer) != (-1, -1)
    assert 200 < found < 1800  # both outcomes well covered
    assert niah.find_span([5, 1, 2, 3], [1, 2, 3, 4, 9]) == (-1, -1)
    assert niah.find_span([7, 7, 1, 2], [1, 2]) == (2, 4)
    assert niah.find_span([], [1]) == (-1, -1) and niah.find_span([1, 2], []) == (-1, -1)
