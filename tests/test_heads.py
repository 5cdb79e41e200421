"""HeadSet selection, controls, validation, serialization and score statistics."""

import json

import pytest

from retmask.heads import HeadSet, load_scores, parse_head, score_stats


@pytest.fixture
def score_file(tmp_path):
    scores = {f"{l}-{h}": [0.0, 0.0] for l in range(4) for h in range(4)}
    scores["2-1"] = [0.9, 0.7]  # mean 0.8
    scores["1-3"] = [0.3, 0.1]  # 0.2
    scores["3-0"] = [0.1, 0.1]  # 0.1
    scores["0-2"] = [0.05, 0.03]  # 0.04
    p = tmp_path / "m.json"
    p.write_text(json.dumps(scores))
    return p


def test_tau_topk_and_list(score_file):
    assert HeadSet.from_scores(score_file, tau=0.1).heads == ((1, 3), (2, 1), (3, 0))
    assert HeadSet.from_scores(score_file, topk=2).heads == ((1, 3), (2, 1))
    hs = HeadSet.from_list("15-30, 24-27,15-30")
    assert hs.heads == ((15, 30), (24, 27)) and hs.lowest_layer == 15


def test_controls_same_size_seeded_and_disjoint(score_file):
    sel = HeadSet.from_scores(score_file, tau=0.1)
    nr = HeadSet.from_scores(score_file, tau=0.1, control="non-retrieval", seed=42)
    assert len(nr) == 3 and not set(nr) & set(sel)
    assert nr == HeadSet.from_scores(score_file, tau=0.1, control="non-retrieval", seed=42)
    rnd = HeadSet.from_scores(score_file, tau=0.1, control="random", seed=1, n_layers=4, n_heads=4)
    assert len(rnd) == 3
    many = {HeadSet.from_scores(score_file, tau=0.1, control="random", seed=s).heads for s in range(20)}
    assert len(many) > 5  # the seed matters


def test_provenance_and_json_round_trip(score_file):
    hs = HeadSet.from_scores(score_file, topk=2, control="non-retrieval", seed=7)
    assert hs.source["kind"] == "topk" and hs.source["control"] == "non-retrieval" and len(hs.source["sha256"]) == 64
    back = HeadSet.from_json(hs.to_json())
    assert back == hs and back.source == hs.source and back.digest() == hs.digest()


def test_errors(score_file, tmp_path):
    with pytest.raises(ValueError, match="no head has a mean score >= tau"):
        HeadSet.from_scores(score_file, tau=0.95)
    with pytest.raises(ValueError, match="exactly one of tau"):
        HeadSet.from_scores(score_file, tau=0.1, topk=2)
    with pytest.raises(ValueError, match=r"topk=99: must lie in \[1, 16\]"):
        HeadSet.from_scores(score_file, topk=99)
    with pytest.raises(ValueError, match="head 4-0 does not exist in this model"):
        HeadSet.from_list("4-0").validate(4, 4)
    with pytest.raises(ValueError, match="expected 'layer-head'"):
        parse_head("4:0")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_scores(bad)
    with pytest.raises(ValueError, match="not found"):
        load_scores(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="control='nope'"):
        HeadSet.from_scores(score_file, tau=0.1, control="nope")


def test_stats_against_hand_computed_values():
    scores = {(0, 0): 0.0, (0, 1): 0.0, (1, 0): 1.0, (1, 1): 3.0}
    st = score_stats(scores, thresholds=(0.5,))
    # Gini of [0, 0, 1, 3]: sum |xi - xj| / (2 n^2 mean) = 2*(0+1+3+1+3+2) / (2 * 16 * 1) = 20 / 32
    assert st.gini == pytest.approx(20 / 32)
    assert st.count_at[0.5] == 2 and st.lowest_layer_at[0.5] == 1
    assert st.top1_share == pytest.approx(0.75)  # best 1 % rounds to one head: 3 of 4


def test_bad_heads_and_scores_are_refused(score_file):
    """A head is (layer, head) of non-negative ints, or 'L-H': a negative index would wrap to another head
    when the bitmap is built, so it is refused, as are truncated, float and malformed heads, and scores
    that are not finite numbers."""
    for bad, msg in (([(-1, 0)], "must be >= 0"), ([(0, 1, 2)], "pair of ints"), ([(1.7, 2.2)], "pair of ints"),
                     ([5], "pair of ints"), ("1-x", "two integers"), (None, "heads: expected")):
        with pytest.raises(ValueError, match=msg):
            HeadSet.from_list(bad)
    with pytest.raises(ValueError, match="must be >= 0"):
        HeadSet(((-1, 0),))
    with pytest.raises(ValueError, match=r"head 4-0 does not exist"):
        HeadSet.from_list("4-0").validate(4, 4)
    assert HeadSet.from_list([(1, 2), "1-2", [0, 3]]).heads == ((0, 3), (1, 2))
    for scores, kw, msg in (({}, {"tau": 0.5}, "non-empty"), ({(0, 1): float("nan")}, {"tau": 0.5}, "finite number"),
                            ({(0, 1): 0.9}, {"tau": "0.5"}, "tau='0.5'"), ({(0, 1): 0.9}, {"topk": 2.5}, "topk=2.5"),
                            ({(0, 1): 0.9}, {"tau": 0.5, "control": "other"}, "control='other'")):
        with pytest.raises(ValueError, match=msg):
            HeadSet.from_scores(scores, **kw)
    assert HeadSet.from_scores({"0-1": 0.9, "2-3": 0.1}, tau=0.5).heads == ((0, 1),)
    for text in ("{}", "[1]", "not json"):
        with pytest.raises(ValueError, match="HeadSet JSON"):
            HeadSet.from_json(text)
    bad = score_file.parent / "bad.json"
    bad.write_text(json.dumps({"0-1": [True], "0-2": [0.5]}))
    with pytest.raises(ValueError, match="no booleans"):
        load_scores(bad)
