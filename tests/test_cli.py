"""The `retmask` command: heads selection and the kernel self-check."""

import json

import pytest

from retmask.cli import main
from retmask.engine_config import EngineConfig


def test_heads_command(tmp_path, capsys):
    scores = {f"{layer}-{h}": [float(layer == 1 and h == 2)] for layer in range(3) for h in range(4)}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(scores))
    out = tmp_path / "sel" / "heads.json"
    assert main(["heads", "--scores", str(f), "--tau", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Gini of mean scores" in text and "1 heads selected (lowest layer 1): 1-2" in text
    assert json.loads(out.read_text())["heads"] == ["1-2"]
    assert main(["heads", "--scores", str(f), "--tau", "2"]) == 2
    assert "no head has a mean score >= tau" in capsys.readouterr().err


def test_heads_command_on_a_detect_run_selects_by_either_rule(tmp_path, capsys):
    """A detect folder holds both rules: --score-rule picks one, and --tau reports both selections and their overlap
    (the sets and Jaccard index worked out by hand from the records below)."""
    from retmask.heads import file_sha256

    run = tmp_path / "run"
    run.mkdir()
    z = [0.0, 0.0, 0.0]
    recs = [{"key": "a", "counted": True, "scores": [[2.0, 0.6, 0.0], [0.4, 0.0, 0.9], z],
             "scores_paper": [[0.5, 0.6, 0.0], [0.4, 0.0, 0.9], z]},
            {"key": "b", "counted": True, "scores": [[1.0, 0.6, 0.0], [0.8, 0.0, 0.1], z],
             "scores_paper": [[0.5, 0.2, 0.0], [0.8, 0.0, 0.1], z]},
            {"key": "c", "counted": False, "scores": [[5.0] * 3] * 3, "scores_paper": [[1.0] * 3] * 3}]
    (run / "tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # mean reference [[1.5, .6, 0], [.6, 0, .5], 0]: 4 heads >= 0.5; paper [[.5, .4, 0], [.6, 0, .5], 0]: 3 heads
    assert main(["heads", "--scores", str(run), "--tau", "0.5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"reference-rule scores from {run / 'tests.jsonl'}")
    assert "tau 0.5: reference 4 heads, paper 3 heads, 3 in both (Jaccard 0.75)" in text
    assert "4 heads selected (lowest layer 0): 0-0,0-1,1-0,1-2" in text
    out = tmp_path / "paper.json"
    assert main(["heads", "--scores", str(run / "tests.jsonl"), "--tau", "0.5", "--score-rule", "paper",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tau 0.5: reference 4 heads, paper 3 heads" in text
    assert "3 heads selected (lowest layer 0): 0-0,1-0,1-2" in text
    src = json.loads(out.read_text())["source"]
    assert src["score_rule"] == "paper" and src["sha256"] == file_sha256(run / "tests.jsonl") and src["tau"] == 0.5
    assert main(["heads", "--scores", str(run), "--topk", "1", "--score-rule", "paper"]) == 0
    assert "Jaccard" not in capsys.readouterr().out  # the comparison is of thresholds


def test_check_kernels_command(capsys):
    assert main(["check-kernels"]) == 0
    out = capsys.readouterr().out
    assert "8/8 cases agree" in out and "FAIL" not in out


def test_engine_flags_reach_the_engine():
    """--admit-rows and the other engine flags of every model command become Engine arguments."""
    import argparse

    from retmask import cli, commands

    p = argparse.ArgumentParser()
    cli._model_args(p)
    args = p.parse_args(["--admit-rows", "6", "--slots", "12", "--prefill-tokens", "999", "--chunk", "64",
                         "--reuse-prefix", "0"])
    assert commands._engine_config(args) == EngineConfig(chunk=64, decode="auto", prefill_tokens=999, slots=12,
                                                         admit_rows=6, reuse_prefix=0)
    default = commands._engine_config(p.parse_args([]))
    assert default == EngineConfig() and default.reuse_prefix == 128 and default.admit_rows is None




def _refused(capsys, argv, *fragments):
    """`retmask argv` exits 2 with an error naming each fragment (no traceback: any other exception fails)."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    for f in fragments:
        assert f in err, (argv, err)


def test_bad_input_is_refused_clearly_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """Each mistake a user can make on the command line gets one line naming the input, and none of them
    loads a model first (a model loads in minutes at 8B)."""
    import gzip

    import torch

    from retmask import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", no_load)
    scores = tmp_path / "s.json"
    scores.write_text(json.dumps({f"{layer}-{h}": [0.1 * h] for layer in range(4) for h in range(4)}))
    empty = tmp_path / "empty"
    empty.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    grid = ["--lengths", "2", "--depths", "2", "--needles", "1"]

    # score files: missing, or a folder (the detect run's) instead of its head_scores.json
    _refused(capsys, ["heads", "--scores", str(tmp_path / "nope.json"), "--tau", "0.1"], "nope.json: not found")
    _refused(capsys, ["pairs", "--scores", str(tmp_path / "nope.json"), "--tau", "0.1"], "nope.json: not found")
    _refused(capsys, ["niah", "--scores", str(tmp_path), "--tau", "0.1"], "is a folder")
    # a control or an output with no selection to be a control of
    _refused(capsys, ["heads", "--scores", str(scores), "--control", "random"], "--control needs a selection")
    _refused(capsys, ["heads", "--scores", str(scores), "--out", str(tmp_path / "h.json")], "--out needs a selection")
    _refused(capsys, ["pairs", "--heads", "0-1", "--control", "random"], "--control random")
    _refused(capsys, ["niah", "--scores", str(scores)], "--tau or --topk")
    # a negative tau selects every head; an --out that is a folder; a rule the score file does not hold
    for cmd in (["heads", "--scores", str(scores)], ["niah", "--scores", str(scores)],
                ["pairs", "--scores", str(scores)]):
        _refused(capsys, [*cmd, "--tau", "-1"], "--tau -1: must be >= 0")
    _refused(capsys, ["heads", "--scores", str(scores), "--tau", "0.1", "--out", str(empty)],
             f"--out {empty}: is a folder", "heads.json")
    _refused(capsys, ["heads", "--scores", str(scores), "--tau", "0.1", "--score-rule", "paper"],
             "s.json holds reference-rule scores only", "pass the detect run's folder")
    _refused(capsys, ["heads", "--scores", str(empty), "--tau", "0.1"], "no tests.jsonl")
    # a threshold above every score: the error, and no statistics table before it
    assert main(["heads", "--scores", str(scores), "--tau", "1e9"]) == 2
    cap = capsys.readouterr()
    assert "no head has a mean score >= tau" in cap.err and cap.out == ""
    # heads outside the model come before anything about controls; non-retrieval needs the scores
    _refused(capsys, ["niah", "--heads", "9-9"], "9-9")
    _refused(capsys, ["niah", "--heads", " "], "give at least one head")
    _refused(capsys, ["niah", "--heads", "0-1", "--controls", "non-retrieval"], "needs the score table")
    # devices, engine sizes, models
    _refused(capsys, ["detect", "--device", "foo", *grid], "--device 'foo': not a device")
    if not torch.cuda.is_available():
        _refused(capsys, ["detect", "--device", "cuda", *grid], "sees no CUDA GPU")
    for flag, v in (("--slots", "-1"), ("--slots", "0"), ("--chunk", "0"), ("--admit-rows", "0"),
                    ("--kv-budget-gb", "0"), ("--reuse-prefix", "-1")):
        _refused(capsys, ["niah", flag, v, *grid], f"{flag} {v}: must be")
    _refused(capsys, ["detect", "--model", str(empty), *grid], "has no config.json")
    _refused(capsys, ["pairs", "--model", str(gpt2), "--heads", "0-1"], "model_type 'gpt2' is not supported")
    _refused(capsys, ["train", "--model", str(empty), "--pairs", str(tmp_path)], "no pairs-*.jsonl.gz")
    _refused(capsys, ["detect", "--lengths", "1", "--max", "200"], "--lengths 1")
    _refused(capsys, ["detect", "--plan", "--tflops", "0"], "--tflops 0: must be > 0")
    _refused(capsys, ["detect", "--plan", "--model", str(empty)], "has no config.json")
    # generation and training numbers
    _refused(capsys, ["pairs", "--heads", "0-1", "--max-new-tokens", "0"], "max_new_tokens=0: must be >= 1")
    _refused(capsys, ["pairs", "--heads", "0-1", "--max-prompt-tokens", "-1"], "max_prompt_tokens=-1")
    # the prompt cap plus the new tokens past the model's context (the toy's max_position_embeddings: 32768)
    _refused(capsys, ["pairs", "--heads", "0-1", "--max-new-tokens", "100000"],
             "--max-new-tokens 100000: a prompt of up to 2048 tokens", "context of model 'toy' (32768 tokens",
             "give --max-new-tokens 30720 or less")
    _refused(capsys, ["pairs", "--heads", "0-1", "--max-new-tokens", "32768", "--max-prompt-tokens", "0"],
             "give --max-new-tokens 32767 or less")
    with gzip.open(tmp_path / "pairs-00000.jsonl.gz", "wt") as f:
        f.write("{}\n")
    for flag in ("--effective-batch", "--per-device-batch", "--max-length", "--epochs"):
        _refused(capsys, ["train", "--pairs", str(tmp_path), flag, "0"], f"{flag} 0: must be")
    _refused(capsys, ["train", "--model", str(empty), "--pairs", str(tmp_path)], "has no config.json")
    # a malformed instructions file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    _refused(capsys, ["pairs", "--heads", "0-1", "--data", str(bad), "--out", str(tmp_path / "p")],
             "bad.jsonl:2: not JSON")
    # an existing run is refused before the model loads
    for cmd, extra, shard in (("detect", grid, "tests-00000.jsonl"), ("pairs", ["--heads", "0-1", "--limit", "4"],
                                                                      "pairs-00000.jsonl.gz")):
        out = tmp_path / cmd
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / shard).write_text("{}\n")
        _refused(capsys, [cmd, *extra, "--out", str(out)], "already holds results")
    # settings checked before the model loads, and before anything is written to --out
    bad_out = tmp_path / "never"
    for argv, why in ((["pairs", "--heads", "0-1", "--top-p", "2"], "top_p=2.0: must lie in (0, 1]"),
                      (["pairs", "--heads", "0-1", "--temperature", "-1"],
                       "temperature=-1.0: must be a finite number >= 0"),
                      (["pairs", "--heads", "0-1", "--data", str(tmp_path / "nope.jsonl")],
                       "nope.jsonl': no such file"),
                      (["detect", "--haystack", str(tmp_path / "nope")], "--haystack"),
                      (["detect", "--needles-file", str(tmp_path / "nope.jsonl")], "--needles-file"),
                      (["detect", "--buffer", "100000"], "--buffer 100000: must lie in [0, --max 512)"),
                      (["detect", "--buffer", "-1"], "--buffer -1"),
                      (["niah", "--steps", "-1"], "--steps -1: must be >= 1"),
                      (["detect", "--depths", "0"], "--depths 0"),
                      (["detect", "--model", str(tmp_path / "notok")], "the folder has no tokenizer"),
                      (["train", "--model", str(tmp_path / "noarch"), "--pairs", str(tmp_path)],
                       "names no architectures"),
                      (["train", "--model", str(tmp_path / "notok"), "--pairs", str(tmp_path)], "has no tokenizer")):
        if argv[0] == "detect" and "notok" in argv[-1]:
            from retmask import toy

            (tmp_path / "notok").mkdir()
            (tmp_path / "notok" / "config.json").write_text((toy.ASSET_DIR / "config.json").read_text())
            noarch = tmp_path / "noarch"
            noarch.mkdir()
            cfg = json.loads((toy.ASSET_DIR / "config.json").read_text())
            cfg.pop("architectures")
            (noarch / "config.json").write_text(json.dumps(cfg))
            (noarch / "tokenizer.json").write_text((toy.ASSET_DIR / "tokenizer.json").read_text())
        _refused(capsys, [*argv, *(["--out", str(bad_out)] if argv[0] != "train" else [])], why)
        assert not bad_out.exists(), argv
    monkeypatch.setenv("RETMASK_BACKEND", "fast")
    _refused(capsys, ["detect", "--out", str(bad_out)], "RETMASK_BACKEND='fast' is not a backend")
    assert not bad_out.exists()


def test_niah_heads_without_scores_get_a_random_control(capsys, monkeypatch, tmp_path):
    """Explicit heads without a score table: the random control is drawn from every head of the model."""
    from retmask import causal

    def stop(out, model, grid, policies, **kw):
        raise ValueError("policies " + ",".join(p.label for p in policies) + " sizes " +
                         ",".join(str(len(p.heads)) for p in policies if p.heads is not None))

    monkeypatch.setattr(causal, "prepare_run", stop)
    _refused(capsys, ["niah", "--heads", "0-1,2-3", "--out", str(tmp_path)],
             "policies original,heads-all,heads-generated,random-all,random-generated sizes 2,2,2,2")


def test_demo_never_wipes_a_folder_it_did_not_write(tmp_path, capsys):
    from retmask.demo import clear_out

    mine = tmp_path / "old-demo"
    (mine / "detect").mkdir(parents=True)
    (mine / "summary.json").write_text("{}")
    clear_out(mine)  # an earlier demo's folder is replaced
    assert not mine.exists()
    user = tmp_path / "work"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (user / "detect").mkdir()
    _refused(capsys, ["demo", "--out", str(user)], "notes.txt", "give a new or empty folder")
    assert (user / "notes.txt").read_text() == "keep me" and (user / "detect").is_dir()


def test_detect_with_no_counted_test_says_no_scores_were_written(tmp_path, capsys, monkeypatch):
    """When no answer passes ROUGE-1 recall > 50 there are no head scores: the command says so instead of
    listing head_scores.json among the files it wrote."""
    from retmask import detect, models

    monkeypatch.setattr(models, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(detect.Detector, "run", lambda self, out, **kw: {
        "tests": 8, "counted": 0, "mean_rouge": 12.5, "stats": None})
    assert main(["detect", "--lengths", "2", "--depths", "2", "--needles", "2", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "8 tests, 0 counted" in out and "head_scores.json is not written" in out
    assert "wrote" in out and "head_scores.json," not in out.splitlines()[-1]


def test_grid_inputs_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A missing model is named before any grid setting; a needles file with a missing field and an empty
    haystack are refused before the weights load; a grid past the model's positions warns before the first test."""
    from retmask import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", no_load)
    grid = ["--lengths", "2", "--depths", "2", "--needles", "1"]
    for cmd in ("detect", "niah"):
        # the buffer (200) does not fit --max 128 either: the model is the mistake to name first
        _refused(capsys, [cmd, "--model", str(tmp_path / "nonexistent"), "--min", "128", "--max", "128"],
                 "nonexistent': no such folder")
    needles = tmp_path / "needles.jsonl"
    needles.write_text('{"needle": "The code is 7.", "question": "What is the code?"}\n')
    hay = tmp_path / "hay.txt"
    hay.write_text(" \n\n")
    extra = {"detect": [], "niah": ["--heads", "0-1"]}
    for cmd in ("detect", "niah"):
        _refused(capsys, [cmd, *extra[cmd], "--needles-file", str(needles), *grid, "--out", str(tmp_path / cmd)],
                 "needles.jsonl:1: missing string field(s) ['real_needle']")
        _refused(capsys, [cmd, *extra[cmd], "--haystack", str(hay), *grid, "--out", str(tmp_path / cmd)],
                 "hay.txt is empty")
    # past max_position_embeddings (the toy's is 32768): one warning line, before the (refused) model load
    for cmd in ("detect", "niah"):
        with pytest.raises(AssertionError, match="a model was loaded"):
            main([cmd, *extra[cmd], "--min", "40000", "--max", "40000", "--lengths", "1", "--depths", "1",
                  "--needles", "1", "--out", str(tmp_path / f"{cmd}-long")])
        err = capsys.readouterr().err
        assert "runs past the model's max_position_embeddings 32768" in err and len(err.splitlines()) == 1


def test_detect_score_rule_reaches_the_run(tmp_path, capsys, monkeypatch):
    """`--score-rule` becomes the run's DetectConfig field (recorded in config.json before the model loads)."""
    from retmask import detect, models

    seen = {}
    monkeypatch.setattr(models, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(detect.Detector, "run", lambda self, out, **kw: seen.update(cfg=self.cfg) or {
        "tests": 8, "counted": 0, "mean_rouge": 12.5, "stats": None})
    grid = ["--lengths", "2", "--depths", "2", "--needles", "2"]
    assert main(["detect", *grid, "--score-rule", "paper", "--out", str(tmp_path / "d")]) == 0
    assert seen["cfg"].score_rule == "paper"
    assert json.loads((tmp_path / "d" / "config.json").read_text())["score_rule"] == "paper"
    assert "head scores by the paper rule" in capsys.readouterr().out
    assert main(["detect", *grid, "--out", str(tmp_path / "e")]) == 0
    assert seen["cfg"].score_rule == "reference"
