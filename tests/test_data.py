"""Instructions from every supported schema, written as small local files."""

import json

import pytest

from retmask.data import load_instructions


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_lmsys_conversation_first_user_turn(tmp_path):
    rows = [
        {"conversation_id": "a", "conversation": [{"role": "system", "content": "be nice"},
                                                  {"role": "user", "content": "hi there"},
                                                  {"role": "assistant", "content": "hello"},
                                                  {"role": "user", "content": "second turn"}], "redacted": False},
        {"conversation_id": "b", "conversation": [{"role": "user", "content": "my name is NAME_1"}], "redacted": True},
        {"conversation_id": "c", "conversation": [{"role": "user", "content": "  "}], "redacted": False},
        {"conversation_id": "d", "conversation": [{"role": "user", "content": "hi there"}], "redacted": False},
        {"conversation_id": "e", "conversation": [{"role": "user", "content": "third"}], "redacted": False},
    ]
    ins = load_instructions(_jsonl(tmp_path / "lmsys.jsonl", rows))
    assert ins.schema == "conversation"
    assert ins.items == [("a", "hi there"), ("e", "third")]  # no system turn, first user turn only
    assert dict(ins.skipped) == {"redacted": 1, "empty": 1, "duplicate": 1}


def test_wildchat_extra_turn_fields_and_slice(tmp_path):
    rows = [{"conversation_hash": f"h{i}", "conversation": [
        {"role": "user", "content": f"q{i}", "language": "English", "toxic": False, "timestamp": None},
        {"role": "assistant", "content": "a", "language": "English"}]} for i in range(10)]
    ins = load_instructions(_jsonl(tmp_path / "wild.jsonl", rows), start=2, end=8, limit=3)
    assert ins.items == [("h2", "q2"), ("h3", "q3"), ("h4", "q4")]
    plain = [{"prompt": f"p{i}"} for i in range(10)]  # no id column: the source id is the row index in the file
    for kw in ({}, {"streaming": True}):
        ins = load_instructions(_jsonl(tmp_path / "plain.jsonl", plain), start=7, end=20, **kw)
        assert ins.items == [("7", "p7"), ("8", "p8"), ("9", "p9")]
        with pytest.raises(ValueError, match=r"no rows in \[10, None\)"):
            load_instructions(_jsonl(tmp_path / "plain.jsonl", plain), start=10, **kw)


def test_synth_variant_and_sharegpt_turns(tmp_path):
    rows = [{"synthesized_multiturn_conversation": [{"from": "human", "value": "synthetic question"},
                                                     {"from": "gpt", "value": "x"}]}]
    ins = load_instructions(_jsonl(tmp_path / "synth.jsonl", rows))
    assert ins.schema == "synthesized_multiturn_conversation" and ins.items[0][1] == "synthetic question"


def test_messages_json_and_parquet(tmp_path):
    rows = [{"id": "m1", "messages": [{"role": "user", "content": "from messages"}]}]
    p = tmp_path / "m.json"
    p.write_text(json.dumps(rows))
    assert load_instructions(str(p)).items == [("m1", "from messages")]
    import pandas as pd

    pq = tmp_path / "p.parquet"
    pd.DataFrame({"instruction": ["do x", "do y"], "input": ["with this", ""]}).to_parquet(pq)
    ins = load_instructions(str(pq))
    assert [t for _, t in ins.items] == ["do x\n\nwith this", "do y"]
    ins = load_instructions(_jsonl(tmp_path / "pr.jsonl", [{"prompt": "plain prompt"}]))
    assert ins.schema == "prompt" and ins.items[0][1] == "plain prompt"


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"columns \['answer', 'text'\].*need one of"):
        load_instructions(_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "answer": "y"}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|no rows|columns"):
        load_instructions(str(empty))
    with pytest.raises(ValueError, match="every one of 1 rows was skipped"):
        load_instructions(_jsonl(tmp_path / "blank.jsonl", [{"prompt": ""}]))
    with pytest.raises(ValueError, match="no such file"):
        load_instructions("missing.jsonl")


def test_malformed_rows_and_shards_name_the_file(tmp_path):
    """A line that is not JSON names the file and the parser's reason; a prompt that is not text is
    skipped and counted; a cut pairs shard names the shard (it would otherwise surface deep in datasets)."""
    import gzip

    from retmask.pairs import iter_pairs

    bad = tmp_path / "mal.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"^dataset \S+/mal.jsonl:2: not JSON \(Expecting value, column 11\)"):
        load_instructions(str(bad))
    torn = tmp_path / "torn.jsonl"  # a line cut inside a string, as a copy stopped short leaves it
    torn.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "tor\n')
    with pytest.raises(ValueError, match=r"torn.jsonl:3: not JSON \(Unterminated string"):
        load_instructions(str(torn))
    whole = tmp_path / "whole.json"
    whole.write_text('[{"prompt": "a"},\n {"prompt": ]\n')
    with pytest.raises(ValueError, match=r"whole.json:2: not JSON"):
        load_instructions(str(whole))
    ins = load_instructions(_jsonl(tmp_path / "num.jsonl", [{"prompt": 1}, {"prompt": "text"}]))
    assert ins.items == [("1", "text")] and ins.skipped == {"not_text": 1}
    turn = [{"role": "user", "content": "q"}]
    data = gzip.compress(b"".join(json.dumps({"id": i, "prompt": turn, "chosen": turn, "rejected": turn}).encode()
                                  + b"\n" for i in range(200)))
    (tmp_path / "pairs-00000.jsonl.gz").write_bytes(data[: len(data) // 2])  # cut short
    with pytest.raises(ValueError, match=r"pairs shard .*pairs-00000.jsonl.gz: unreadable after line \d+"):
        list(iter_pairs(tmp_path))
    from retmask.train import dpo_dataset

    with pytest.raises(ValueError, match=r"pairs shard .*pairs-00000.jsonl.gz"):  # not datasets' wrapper
        dpo_dataset(tmp_path, tmp_path / "cache")


def test_an_unreachable_hub_fails_at_once_and_a_model_falls_back_to_the_cache(monkeypatch):
    """Offline, the hub libraries retry every file for half a minute: the loaders ask once whether the hub
    answers, then read only the local cache (a model) or refuse at once (a streamed dataset)."""
    from retmask import models

    models.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False
    models.hub_reachable.cache_clear()
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    seen = {}

    def fake_load(name, **kw):
        seen.update(kw)
        raise OSError("not in the cache")

    with pytest.raises(ValueError, match="the hub cannot be reached from here .* its config is not in the local cache"):
        models._hub("org/model", "config", fake_load)
    assert seen == {"local_files_only": True}
    got = models._hub("org/model", "config", lambda name, **kw: (name, kw))
    assert got == ("org/model", {"local_files_only": True})
    with pytest.raises(ValueError, match="'org/chats': the hub cannot be reached"):
        load_instructions("org/chats")


def test_offline_training_reads_a_hub_name_from_its_cached_snapshot(monkeypatch, tmp_path):
    """TRL's DPOTrainer loads the model itself and would retry the hub for every file: offline, `train` hands it
    (and the tokenizer) the cached snapshot folder of a hub name, while its record keeps the name. A name that
    is not cached is refused at once, naming it; a local folder, or any name while the hub answers, is given
    as it is."""
    import gzip
    from pathlib import Path

    import huggingface_hub.constants as hub_constants
    import transformers

    from retmask import models
    from retmask.train import TrainConfig, train

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert Path(models.load_path("org/tiny")) == snap
    with pytest.raises(ValueError, match="'org/other': the hub cannot be reached .* not in the local cache"):
        models.load_path("org/other")
    assert models.load_path(str(tmp_path)) == str(tmp_path)

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    turn = [{"role": "user", "content": "q"}]
    (pairs / "pairs-00000.jsonl.gz").write_bytes(gzip.compress(b"".join(
        json.dumps({"id": i, "prompt": turn, "chosen": turn, "rejected": turn}).encode() + b"\n" for i in range(4))))
    seen = []

    def tokenizer_from(name, *a, **k):
        seen.append(name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from)
    with pytest.raises(RuntimeError, match="stop here"):
        train("org/tiny", pairs, tmp_path / "out", TrainConfig.preset("toy"), log=lambda *a, **k: None)
    assert [Path(s) for s in seen] == [snap]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"] == "org/tiny"
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert models.load_path("org/other") == "org/other"
