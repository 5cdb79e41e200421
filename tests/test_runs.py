"""Crash-safe run files: the torn-tail repair."""

import json

import pytest

from retmask.runs import drop_torn_tail, prepare_out, read_jsonl

BIG = '{"x": "' + "y" * 100_000 + '"}\n'  # one line longer than the tail the quick check reads


@pytest.mark.parametrize("text,kept", [
    ('{"a": 1}\n{"a": 2}\n', 2), ('{"a": 1}\n{"a": 2', 1), ('{"a": 1}\n{"a": \n', 1), ("", 0), ('{"a"', 0),
    (BIG * 2, 2), (BIG * 2 + '{"x": "yy', 2), ('{"a": 1}\n' * 5000 + '{"a', 5000)])
def test_drop_torn_tail_keeps_every_whole_record_and_nothing_else(tmp_path, text, kept):
    p = tmp_path / "shard.jsonl"
    p.write_text(text)
    whole = []  # every record up to the first line that does not parse
    for line in text.splitlines():
        try:
            whole.append(json.loads(line))
        except ValueError:
            break
    drop_torn_tail(p)
    assert read_jsonl(p) == whole and len(whole) == kept
    assert p.read_text() == "".join(json.dumps(r) + "\n" for r in whole)  # appends start on a clean line
    assert not list(tmp_path.glob("*.tmp"))


def test_a_folder_a_stopped_run_left_without_results_does_not_block_a_new_start(tmp_path):
    """A run stopped before writing any record (bad input found after its start, a crash while loading the
    model) leaves config.json and empty folders: a new start needs neither --resume nor --overwrite; one
    record anywhere makes it a run that is refused without them."""
    out = tmp_path / "run"
    prepare_out(out, {"a": 1}, resume=False, overwrite=False, names=("work",))
    (out / "work").mkdir()
    (out / "work" / "part.jsonl").write_text("")
    prepare_out(out, {"a": 2}, resume=False, overwrite=False, names=("work",))  # another config, nothing held
    assert json.loads((out / "config.json").read_text()) == {"a": 2}
    (out / "work" / "part.jsonl").write_text('{"id": 0}\n')
    with pytest.raises(ValueError, match="already holds results"):
        prepare_out(out, {"a": 2}, resume=False, overwrite=False, names=("work",))
    with pytest.raises(ValueError, match="different configuration"):
        prepare_out(out, {"a": 3}, resume=True, overwrite=False, names=("work",))
    prepare_out(out, {"a": 2}, resume=True, overwrite=False, names=("work",))
    assert (out / "work" / "part.jsonl").read_text() == '{"id": 0}\n'
    prepare_out(out, {"a": 3}, resume=False, overwrite=True, names=("work",))
    assert not (out / "work").exists() and json.loads((out / "config.json").read_text()) == {"a": 3}
