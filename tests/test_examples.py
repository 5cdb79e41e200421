"""The examples in examples/ run as a user runs them (`python examples/x.py` from the checkout root) and
print what they claim."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args) -> str:
    r = subprocess.run([sys.executable, f"examples/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_engine_quickstart_prints_both_rows_and_the_original_is_greedy_generate():
    """Two rows, original first; the original row's text is what transformers' greedy `generate` gives the
    unpatched toy model for the same prompt, and switching the heads off changes the answer."""
    import torch

    from retmask import toy

    rows = [line.split(" | ", 1) for line in _run("engine_quickstart.py").splitlines() if " | " in line]
    assert [p.strip() for p, _ in rows] == ["original", "off7-all"]
    model, tok = toy.load()
    first = json.loads((toy.ASSET_DIR.parent / "instructions.jsonl").open().readline())
    ids = tok.apply_chat_template(first["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    assert rows[0][1] == tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert rows[1][1] != rows[0][1]


def test_detect_then_pairs_writes_the_pairs_it_reports(tmp_path):
    out = _run("detect_then_pairs.py", str(tmp_path))
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["detect"] == "18 tests, 18 counted"
    assert int(lines["heads"].split()[0]) >= 1
    n, _, rest = lines["pairs"].partition(" records in ")
    path = Path(rest.split(" (")[0])
    assert path.parent == tmp_path / "pairs" and path.name.startswith("pairs-")
    records = [json.loads(x) for x in gzip.open(path, "rt")]
    assert len(records) == int(n) == 8
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in records)
    assert "first pair: chosen" in out
