"""The `retmask` command: heads selection and the kernel self-check."""

import json

from retmask.cli import main


def test_heads_command(tmp_path, capsys):
    scores = {f"{l}-{h}": [float(l == 1 and h == 2)] for l in range(3) for h in range(4)}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(scores))
    out = tmp_path / "sel" / "heads.json"
    assert main(["heads", "--scores", str(f), "--tau", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Gini of mean scores" in text and "1 heads selected (lowest layer 1): 1-2" in text
    assert json.loads(out.read_text())["heads"] == ["1-2"]
    assert main(["heads", "--scores", str(f), "--tau", "2"]) == 2
    assert "no head has a mean score >= tau" in capsys.readouterr().err


def test_check_kernels_command(capsys):
    assert main(["check-kernels"]) == 0
    out = capsys.readouterr().out
    assert "8/8 cases agree" in out and "FAIL" not in out


def test_engine_flags_reach_the_engine():
    """--admit-rows and the other engine flags of every model command become Engine arguments."""
    import argparse

    from retmask import cli

    p = argparse.ArgumentParser()
    cli._model_args(p)
    args = p.parse_args(["--admit-rows", "6", "--slots", "12", "--prefill-tokens", "999", "--chunk", "64"])
    assert cli._engine_kw(args) == {"chunk": 64, "decode": "auto", "prefill_tokens": 999, "slots": 12,
                                    "admit_rows": 6}
    assert "admit_rows" not in cli._engine_kw(p.parse_args([]))


