"""Crash-safe run files: the torn-tail repair."""

import json

import pytest

from retmask.runs import drop_torn_tail, read_jsonl

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
