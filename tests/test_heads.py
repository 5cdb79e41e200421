"""HeadSet selection, controls, validation, serialization and score statistics."""

import json

import pytest

from retmask.heads import HeadSet, load_scores, parse_head, score_stats


@pytest.fixture
def score_file(tmp_path):
    scores = {f"{layer}-{h}": [0.0, 0.0] for layer in range(4) for h in range(4)}
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


def _detect_run(folder, rule="reference", paper=True):
    """A `retmask detect` folder's tests.jsonl (2 x 2 heads): two counted tests and one not counted."""
    recs = [{"key": "a", "counted": True, "scores": [[1.5, 0.0], [0.2, 0.0]], "scores_paper": [[0.5, 0.0], [0.2, 0.0]]},
            {"key": "b", "counted": True, "scores": [[0.5, 0.1], [0.0, 0.0]], "scores_paper": [[0.5, 0.1], [0.0, 0.0]]},
            {"key": "c", "counted": False, "scores": [[9.0, 9.0], [9.0, 9.0]], "scores_paper": [[1, 1], [1, 1]]}]
    folder.mkdir()
    with (folder / "tests.jsonl").open("w") as f:
        for r in recs:
            if not paper:
                r.pop("scores_paper")
            f.write(json.dumps(r) + "\n")
    (folder / "detect.json").write_text(json.dumps({"score_rule": rule}))
    return folder


def test_score_source_reads_both_rules_from_a_detect_run(tmp_path):
    from retmask.heads import load_score_source

    run = _detect_run(tmp_path / "run", rule="paper")
    for given in (run, run / "tests.jsonl"):
        src = load_score_source(given)
        assert src.file == run / "tests.jsonl" and src.rule == "paper"  # the rule the run chose
        # means over the counted tests a and b only
        assert src.scores("reference") == pytest.approx({(0, 0): 1.0, (0, 1): 0.05, (1, 0): 0.1, (1, 1): 0.0})
        assert src.scores("paper") == pytest.approx({(0, 0): 0.5, (0, 1): 0.05, (1, 0): 0.1, (1, 1): 0.0})
        assert src.scores() == src.scores("paper")
    # a head_scores.json holds the rule its run names, and only that one
    (run / "head_scores.json").write_text(json.dumps({"0-0": [0.5, 0.5], "0-1": [0.0, 0.1]}))
    src = load_score_source(run / "head_scores.json")
    assert src.rule == "paper" and src.scores() == pytest.approx({(0, 0): 0.5, (0, 1): 0.05})
    with pytest.raises(ValueError, match="holds paper-rule scores only; pass the detect run's folder"):
        src.scores("reference")
    loose = tmp_path / "scores.json"  # a file with no run beside it: the reference rule (the released files')
    loose.write_text(json.dumps({"0-0": [2.0]}))
    assert load_score_source(loose).rule == "reference"
    with pytest.raises(ValueError, match="--score-rule paper: .*scores.json holds reference-rule scores only"):
        load_score_source(loose).scores("paper")
    old = load_score_source(_detect_run(tmp_path / "old", paper=False))  # before the paper rule was recorded
    assert old.scores("reference")[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no paper-rule scores .* rerun `retmask detect`"):
        old.scores("paper")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no tests.jsonl"):
        load_score_source(empty)
    with pytest.raises(ValueError, match="not found"):
        load_score_source(tmp_path / "gone" / "tests.jsonl")
    (empty / "tests.jsonl").write_text(json.dumps({"key": "c", "counted": False, "scores": [[1]]}) + "\n")
    with pytest.raises(ValueError, match="no counted test"):
        load_score_source(empty)


def test_negative_tau_is_refused(score_file):
    with pytest.raises(ValueError, match=r"tau=-1: must be >= 0"):
        HeadSet.from_scores(score_file, tau=-1)
    assert len(HeadSet.from_scores(score_file, tau=0)) == 16  # tau 0 still selects every head, on purpose


def test_score_source_refuses_a_malformed_tests_jsonl(tmp_path):
    from retmask.heads import load_score_source

    for bad in ([[0.5, "x"]], [0.5], [[0.5], []]):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "tests.jsonl").write_text(json.dumps({"key": "a", "counted": True, "scores": bad}) + "\n")
        with pytest.raises(ValueError, match="not a \\(layers, heads\\) table of numbers|finite number"):
            load_score_source(run)
