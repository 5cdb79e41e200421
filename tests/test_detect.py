"""Detection on the shipped toy model: scores, outputs, resume after SIGKILL, two processes (gloo),
memory linear in context, and the causal check."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retmask import causal, toy
from retmask.detect import DetectConfig, Detector, read_jsonl
from retmask.engine import EngineConfig, GenConfig, Group
from retmask.heads import HeadSet, load_scores

pytestmark = pytest.mark.skipif(not toy.available(), reason="toy model not built")
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(min_len=160, max_len=480, n_lengths=2, n_depths=3, n_needles=2, buffer=32, steps=10)


@pytest.fixture(scope="module")
def toy_model():
    return toy.load()


@pytest.fixture(scope="module")
def detected(toy_model, tmp_path_factory):
    model, tok = toy_model
    out = tmp_path_factory.mktemp("detect")
    det = Detector(model, tok, DetectConfig(**SMALL), model_name="toy", engine=EngineConfig(slots=3))
    summary = det.run(out, progress=False)
    return out, {**summary, "prefill": det.prefill}


def _cli(*args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "retmask.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, **kw)


def test_detection_finds_retrieval_heads(detected):
    out, s = detected
    assert s["tests"] == 12 and s["counted"] >= 11  # the toy answers its NIAH tests
    scores = load_scores(out / "head_scores.json")  # reference format, as HeadSet reads it
    assert len(scores) == toy.CONFIG["num_hidden_layers"] * toy.CONFIG["num_attention_heads"]
    assert max(scores.values()) >= 0.5
    hs = HeadSet.from_scores(out / "head_scores.json", tau=0.5)
    assert 1 <= len(hs) <= 6  # few heads do the copying
    raw = json.loads((out / "head_scores.json").read_text())
    assert all(len(v) == s["counted"] for v in raw.values())
    for name in ("detect.json", "tests.jsonl", "heads.png", "niah.png"):
        assert (out / name).stat().st_size > 0


def test_records_agree_with_recomputed_scores(detected, toy_model):
    """Every record's per-head scores equal retrieval_scores recomputed from an eager HF forward, with most
    prompts' haystack prefix reused from another prompt's KV rather than computed."""
    from retmask import niah, scoring

    out, s = detected
    model, tok = toy_model
    recs = read_jsonl(out / "tests.jsonl")
    total = sum(r["prompt_tokens"] - 1 for r in recs)  # the 12 prompts are distinct under sentence placement
    assert s["prefill"]["prompt_tokens"] + s["prefill"]["reused_tokens"] == total
    assert s["prefill"]["reused_tokens"] > 0.15 * total  # 688 of 3768: the haystacks before depth 50 and 100
    det = Detector(model, tok, DetectConfig(**SMALL))
    fresh = toy.load()[0]
    fresh.config._attn_implementation = "eager"
    tests = {t.key: t for t in det.tests}
    for rec in recs:
        t = tests[rec["key"]]
        prompt = niah.prompt_ids(tok, det.haystacks[t.needle_idx], det.needles[t.needle_idx], t.length, t.depth,
                                 buffer=SMALL["buffer"])
        ids = torch.tensor([prompt + rec["tokens"]])
        with torch.no_grad():
            o = fresh(ids, output_attentions=True)
        P, T = len(prompt), len(rec["tokens"])
        # step t's query is the token at P-1+t; its argmax over all keys up to itself
        att = torch.stack(o.attentions)[:, 0, :, P - 1: P - 1 + T]  # (L, H, T, S)
        am = att.argmax(-1).permute(2, 0, 1)  # (T, L, H)
        greedy = o.logits[0, P - 1: P - 1 + T].argmax(-1).tolist()
        assert greedy == rec["tokens"], rec["key"]
        want = scoring.retrieval_scores(prompt, tuple(rec["span"]), rec["tokens"], am)
        torch.testing.assert_close(torch.tensor(rec["scores"]), want, atol=1e-5, rtol=0)
        want = scoring.paper_retrieval_scores(prompt, tuple(rec["span"]), rec["tokens"], am)
        torch.testing.assert_close(torch.tensor(rec["scores_paper"]), want, atol=1e-5, rtol=0)


def test_paper_rule_run_reports_the_paper_scores(detected, toy_model, tmp_path):
    """tests.jsonl records both rules whichever is chosen; head_scores.json and detect.json follow the chosen rule
    (built here from the records of the counted tests)."""
    ref, _ = detected
    model, tok = toy_model
    out = tmp_path / "paper"
    s = Detector(model, tok, DetectConfig(**SMALL, score_rule="paper"), model_name="toy",
                 engine=EngineConfig(slots=3)).run(
        out, progress=False)
    assert (out / "tests.jsonl").read_text() == (ref / "tests.jsonl").read_text()
    recs = [r for r in read_jsonl(out / "tests.jsonl") if r["counted"]]
    L, H = toy.CONFIG["num_hidden_layers"], toy.CONFIG["num_attention_heads"]
    for run, key in ((ref, "scores"), (out, "scores_paper")):
        want = {f"{l}-{h}": [r[key][l][h] for r in recs] for l in range(L) for h in range(H)}
        assert json.loads((run / "head_scores.json").read_text()) == want
        summary = json.loads((run / "detect.json").read_text())
        assert summary["score_rule"] == summary["config"]["score_rule"] == ("paper" if run == out else "reference")
        means = torch.tensor([[sum(v) / len(v) for v in (want[f"{l}-{h}"] for h in range(H))] for l in range(L)])
        torch.testing.assert_close(torch.tensor(summary["mean_scores"]), means)
    paper, reference = (torch.tensor(json.loads((d / "detect.json").read_text())["mean_scores"]) for d in (out, ref))
    assert paper.max() <= 1 and (paper <= reference + 1e-6).all() and (paper < reference).any()
    assert s["score_rule"] == "paper"
    with pytest.raises(ValueError, match="score_rule='other' \\(--score-rule\\): use one of"):
        DetectConfig(**SMALL, score_rule="other").check()


def test_a_run_from_before_the_rule_setting_resumes_as_reference(detected, toy_model, tmp_path):
    import shutil

    ref, _ = detected
    model, tok = toy_model
    old = tmp_path / "old"
    shutil.copytree(ref, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["score_rule"]
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"different configuration \(score_rule\)"):
        Detector(model, tok, DetectConfig(**SMALL, score_rule="paper"), model_name="toy").run(old, resume=True,
                                                                                               progress=False)
    Detector(model, tok, DetectConfig(**SMALL), model_name="toy", engine=EngineConfig(slots=3)).run(old, resume=True,
                                                                                                    progress=False)
    assert (old / "head_scores.json").read_text() == (ref / "head_scores.json").read_text()
    assert json.loads((old / "config.json").read_text())["score_rule"] == "reference"


def test_existing_results_need_resume_or_overwrite(detected, toy_model):
    out, _ = detected
    model, tok = toy_model
    det = Detector(model, tok, DetectConfig(**SMALL), model_name="toy", engine=EngineConfig(slots=3))
    with pytest.raises(ValueError, match="--resume"):
        det.run(out, progress=False)
    other = Detector(model, tok, DetectConfig(**{**SMALL, "steps": 9}), model_name="toy", engine=EngineConfig(slots=3))
    with pytest.raises(ValueError, match="different configuration"):
        other.run(out, resume=True, progress=False)
    s = det.run(out, resume=True, progress=False)  # nothing left to do: merges again, same result
    assert s["counted"] == json.loads((out / "detect.json").read_text())["counted"]


GRID = ["--min-len", "160", "--max-len", "480", "--lengths", "2", "--depths", "3", "--needles", "2", "--buffer", "32",
        "--steps", "10", "--slots", "1", "--chunk", "64", "--no-progress"]


def test_resume_after_sigkill_matches_one_run(detected, tmp_path):
    ref, _ = detected
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "retmask.cli", "detect", *GRID, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "tests-00000.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(shard)) < 3:
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(read_jsonl(shard))
    assert 3 <= n_before < 12, "the kill should land mid-run"
    with shard.open("a") as f:
        f.write('{"key": "torn')  # a line cut by the crash
    r = _cli("detect", *GRID, "--out", str(out))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = _cli("detect", *GRID, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    keys = [x["key"] for x in read_jsonl(shard)]
    assert len(keys) == len(set(keys)) == 12  # nothing lost, nothing twice
    assert (out / "tests.jsonl").read_text() == (ref / "tests.jsonl").read_text()
    assert json.loads((out / "head_scores.json").read_text()) == json.loads((ref / "head_scores.json").read_text())


LAGGING_RANK_1 = """
import sys, time
from retmask import detect, runs
first = [True]
def lagging(read):
    def slow(path):
        if runs.dist()[0] == 1 and first[0]:  # rank 1 reads the finished tests 5 s after rank 0
            first[0] = False
            time.sleep(5)
        return read(path)
    return slow
runs.read_jsonl = lagging(runs.read_jsonl)
detect.read_jsonl = lagging(detect.read_jsonl)
from retmask.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_resume_agree_on_the_split_when_one_rank_lags(detected, tmp_path, free_port):
    """A resume splits the unfinished tests by position, so the ranks must read the same finished set: rank 0
    appending its first new results before a slow rank 1 has read would shift rank 1's split (tests lost,
    others run twice). Also: a torn line in a shard is repaired before anyone reads."""
    ref, _ = detected
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text((ref / "config.json").read_text())
    (out / "tests-00000.jsonl").write_text("".join((ref / "tests-00000.jsonl").read_text().splitlines(True)[:2]) +
                                          '{"key": "torn')
    (tmp_path / "lagging.py").write_text(LAGGING_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           str(tmp_path / "lagging.py"), "detect", *GRID, "--out", str(out), "--resume"]
    r = subprocess.run(cmd, cwd=ROOT / "tests", capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = [x["key"] for p in sorted(out.glob("tests-*.jsonl")) for x in read_jsonl(p)]
    assert len(keys) == len(set(keys)) == 12  # nothing lost, nothing twice
    assert (out / "tests.jsonl").read_text() == (ref / "tests.jsonl").read_text()


def test_two_processes_gloo_equal_one(detected, tmp_path, free_port):
    ref, _ = detected
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           "-m", "retmask.cli", "detect", *GRID, "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(out.glob("tests-*.jsonl"))) == 2
    assert (out / "tests.jsonl").read_text() == (ref / "tests.jsonl").read_text()
    assert json.loads((out / "head_scores.json").read_text()) == json.loads((ref / "head_scores.json").read_text())


def test_unwritable_output_is_refused_before_work(toy_model, tmp_path):
    model, tok = toy_model
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable|--out"):
        Detector(model, tok, DetectConfig(**SMALL)).run(blocker / "sub", progress=False)


_MEM = """
import sys, torch
from retmask import toy
from retmask.detect import DetectConfig, Detector
from retmask.engine import EngineConfig
torch.set_num_threads(1)
model, tok = toy.load()
L = int(sys.argv[1])
det = Detector(model, tok, DetectConfig(min_len=L, max_len=L, n_lengths=1, n_depths=1, n_needles=1, buffer=32,
               steps=4), model_name="toy", engine=EngineConfig(slots=1, chunk=1024))
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
base = kb("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
det.run(sys.argv[2], progress=False)
print(kb("VmHWM:") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_detection_memory_is_linear_in_context(tmp_path):
    used = {}
    for L in (4096, 16384):
        r = subprocess.run([sys.executable, "-c", _MEM, str(L), str(tmp_path / str(L))], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        used[L] = int(r.stdout.strip().splitlines()[-1])
    assert used[16384] <= 4.5 * used[4096], used


def test_causal_check_on_toy(toy_model, detected, capsys):
    """Switching off the top detected heads breaks NIAH; as many non-retrieval heads do not. The 5 policies
    read the prompt 3 ways (the original and the scope-`generated` rows intact), and its KV is held 3 times."""
    out, _ = detected
    model, tok = toy_model
    scores = load_scores(out / "head_scores.json")
    top = HeadSet.from_scores(scores, tau=0.5)
    pols = causal.make_policies(top, scores, controls=("non-retrieval",), scopes=("all", "generated"))
    grid = causal.GridConfig(min_len=160, max_len=toy.TRAIN_LEN, n_lengths=3, n_depths=4, n_needles=2, buffer=32,
                             steps=8, seed=7)
    res = causal.run_niah(model, tok, grid, pols, progress=True, engine=EngineConfig(slots=8))
    assert "each prompt's KV held 3 times for 5 policies" in capsys.readouterr().out
    rec = {r["policy"]: r["recall"] for r in res["policies"]}
    assert rec["original"] >= 95
    assert rec["heads-all"] <= 20
    # scope `generated` leaves the heads on at the last prompt position, which predicts the first of the
    # four answer words: at most that word survives
    assert rec["heads-generated"] <= 30
    assert rec["non-retrieval-all"] >= 80


def test_niah_command(detected, tmp_path, capsys, monkeypatch):
    from retmask.cli import main

    out, _ = detected
    args = ["niah", "--scores", str(out / "head_scores.json"), "--tau", "0.5", "--controls", "random",
            "--scopes", "all", "--min", "160", "--max", "320", "--lengths", "2", "--depths", "2", "--needles", "1",
            "--steps", "6", "--no-progress"]
    rc = main([a for a in args if a != "--no-progress"] + ["--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| original" in text and "heads-all" in text and "random-all" in text
    # the original reads the prompt intact, each scope-`all` ablation its own way: 3 copies for 3 policies
    assert "reused from the KV of prompts with the same prefix; each prompt's KV held 3 times for 3 policies" in text
    assert "pass %: the share of tests whose recall is above 50" in text  # the table's columns explained
    res = json.loads((tmp_path / "niah.json").read_text())
    assert [p["policy"] for p in res["policies"]] == ["original", "heads-all", "random-all"]
    assert (tmp_path / "niah-heads-all.png").exists()
    from retmask import models

    real_load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("loaded the model before refusing the run"))
    assert main(args + ["--out", str(tmp_path)]) == 2  # an existing run: --resume or --overwrite, before loading
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(models, "load", real_load)
    assert main(args + ["--out", str(tmp_path), "--resume"]) == 0  # nothing left to compute
    assert json.loads((tmp_path / "niah.json").read_text()) == res
    assert main(args + ["--out", str(tmp_path / "static"), "--decode", "static"]) == 0  # the graph's step, uncaptured
    assert json.loads((tmp_path / "static" / "niah.json").read_text())["policies"] == res["policies"]


def test_niah_two_processes_equal_one(detected, tmp_path, free_port):
    """torchrun with two gloo processes: each answers every second prompt into its own shard, rank 0 alone
    reports and writes niah.json, which equals one process's; a resume with both ranks computes nothing."""
    out, _ = detected
    args = ["niah", "--scores", str(out / "head_scores.json"), "--tau", "0.5", "--controls", "random",
            "--scopes", "all", "--min-len", "160", "--max-len", "320", "--lengths", "2", "--depths", "2",
            "--needles", "1", "--steps", "6", "--no-progress"]
    assert _cli(*args, "--out", str(tmp_path / "one")).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
           "-m", "retmask.cli", *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("| original") == 1  # one table, from rank 0
    shards = [(tmp_path / "two" / f"tests-0000{r}.jsonl").read_text() for r in (0, 1)]
    assert [len(t.splitlines()) for t in shards] == [2, 2]
    one, two = (json.loads((tmp_path / d / "niah.json").read_text()) for d in ("one", "two"))
    assert two["tests"] == one["tests"] and two["policies"] == one["policies"]
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / "two" / f"tests-0000{r}.jsonl").read_text() for r in (0, 1)] == shards  # nothing recomputed
    assert json.loads((tmp_path / "two" / "niah.json").read_text())["tests"] == one["tests"]


def generated_groups(monkeypatch) -> list:
    """The groups every Engine.generate call receives from now on (the engine still runs them)."""
    from retmask import engine as engine_mod

    ran, gen = [], engine_mod.Engine.generate
    monkeypatch.setattr(engine_mod.Engine, "generate", lambda self, groups, cfg, **kw: (ran.extend(groups),
                                                                                       gen(self, groups, cfg, **kw))[1])
    return ran


def test_niah_resumes_after_a_crash(toy_model, tmp_path, monkeypatch):
    """Each finished prompt is on disk at once; after a crash a rerun with resume computes only the
    prompts not yet there, and its result equals an uninterrupted run's; an existing run needs
    resume or overwrite."""
    model, tok = toy_model
    pols = causal.make_policies(HeadSet.from_list("0-1,0-2"), None, controls=(), scopes=("all",))
    grid = causal.GridConfig(min_len=160, max_len=320, n_lengths=2, n_depths=3, n_needles=1, buffer=32, steps=6,
                             seed=3)
    whole = causal.run_niah(model, tok, grid, pols, progress=False, engine=EngineConfig(slots=2))
    n_prompts = len({(r["length"], r["depth"], r["needle_idx"]) for r in whole["tests"]})
    assert n_prompts == 6

    calls = {"n": 0}
    real = causal.scoring.rouge1_recall

    def crash_on_the_fifth_answer(ref, text):
        calls["n"] += 1
        if calls["n"] == 5:  # prompt 3, its first policy: two prompts are done
            raise KeyboardInterrupt
        return real(ref, text)

    monkeypatch.setattr(causal.scoring, "rouge1_recall", crash_on_the_fifth_answer)
    with pytest.raises(KeyboardInterrupt):
        causal.run_niah(model, tok, grid, pols, progress=False, engine=EngineConfig(slots=2), out=tmp_path,
                        model_name="toy")
    monkeypatch.setattr(causal.scoring, "rouge1_recall", real)
    assert len(read_jsonl(tmp_path / "tests-00000.jsonl")) == 2

    with pytest.raises(ValueError, match="--resume"):
        causal.run_niah(model, tok, grid, pols, progress=False, engine=EngineConfig(slots=2), out=tmp_path,
                        model_name="toy")
    with pytest.raises(ValueError, match="different configuration"):
        causal.run_niah(model, tok, grid, pols[:1], progress=False, engine=EngineConfig(slots=2), out=tmp_path,
                        model_name="toy",
                        resume=True)
    ran = generated_groups(monkeypatch)
    resumed = causal.run_niah(model, tok, grid, pols, progress=False, engine=EngineConfig(slots=2), out=tmp_path,
                              model_name="toy",
                              resume=True)
    assert len(ran) == n_prompts - 2
    assert resumed == whole


def test_niah_resume_reads_an_older_single_log(toy_model, tmp_path, monkeypatch):
    """A folder from before the per-rank shards holds one tests.jsonl: a resume reads it and recomputes nothing."""
    model, tok = toy_model
    pols = causal.make_policies(HeadSet.from_list("0-1,0-2"), None, controls=(), scopes=("all",))
    grid = causal.GridConfig(min_len=160, max_len=320, n_lengths=2, n_depths=2, n_needles=1, buffer=32, steps=6,
                             seed=3)
    whole = causal.run_niah(model, tok, grid, pols, progress=False, engine=EngineConfig(slots=2), out=tmp_path,
                            model_name="toy")
    (tmp_path / "tests-00000.jsonl").rename(tmp_path / "tests.jsonl")
    ran = generated_groups(monkeypatch)
    again = causal.run_niah(model, tok, grid, pols, progress=False, engine=EngineConfig(slots=2), out=tmp_path,
                              model_name="toy",
                            resume=True)
    assert ran == [] and again["tests"] == whole["tests"]


def test_plan_counts_what_one_slot_reuses(toy_model, tmp_path, capsys):
    """`detect.plan` reads the prefill cost from the prompts alone: the tokens it says one slot reuses are
    the ones the engine reuses when detection runs on one slot, and `retmask detect --plan` prints them
    without loading weights."""
    from retmask.cli import main
    from retmask.detect import plan, prefill_flops

    model, tok = toy_model
    cfg = DetectConfig(**SMALL)
    det = Detector(model, tok, cfg, model_name="toy", engine=EngineConfig(slots=1))
    det.run(tmp_path / "one", progress=False)
    prompts = [p for p, _ in cfg.unique_prompts(tok, *cfg.load())]
    r = plan(prompts, model.config)
    assert r["reused_tokens"] == det.prefill["reused_tokens"] > 0
    assert r["prompt_tokens"] - r["reused_tokens"] == det.prefill["prompt_tokens"]
    assert r["flops"] == sum(prefill_flops(model.config, len(p) - 1) for p in prompts) > r["flops_reused"]
    assert plan(prompts, model.config, reuse_prefix=0)["reused_tokens"] == 0
    grid = ["--min", "160", "--max", "480", "--lengths", "2", "--depths", "3", "--needles", "2", "--buffer", "32",
            "--steps", "10", "--no-progress"]
    assert main(["detect", "--plan", *grid, "--tflops", "100"]) == 0
    out = capsys.readouterr().out
    assert f"{r['reused_tokens']:,} (" in out and "12 / 12" in out and "TFLOP/s" in out


def test_niah_plan_sizes_the_cache_as_the_engine_does(toy_model, capsys, monkeypatch):
    """`retmask niah --plan` reads the config and tokenizer only. The KV a group needs is one copy of the
    prompt per prefill stream plus each row's new tokens, in whole blocks (counted here from the config, and
    what an engine over the loaded model holds for such a group), and the blocks a budget holds are that
    engine's pool."""
    import re

    from retmask import models
    from retmask.cli import main
    from retmask.engine import Engine

    model, _ = toy_model
    c = model.config
    L, hkv, d = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    grid = ["--min", "160", "--max", "320", "--lengths", "2", "--depths", "2", "--needles", "1", "--steps", "6"]
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("--plan loaded the model"))
    assert main(["niah", "--heads", "1-0,2-1", "--controls", "random", *grid, "--no-progress", "--dtype", "fp32",
                 "--kv-budget-gb", "0.02", "--plan"]) == 0
    text = capsys.readouterr().out
    longest = int(re.search(r"longest prompt \+ steps\s*\|\s*([\d,]+) \+ 6", text).group(1).replace(",", ""))
    blocks, at_once = map(int, re.search(r"([\d,]+) blocks, (\d+) group\(s\) at once", text).groups())
    pols = causal.make_policies(HeadSet.from_list("1-0,2-1"), {(l, h): 0.0 for l in range(L)
                                                                for h in range(c.num_attention_heads)},
                                controls=("random",))
    rows, streams = len(pols), len({p.prompt_heads for p in pols})
    assert (rows, streams) == (5, 3)
    tb = 2 * hkv * d * 4  # K and V, fp32, per token and layer
    # the prompt (all but its last token) once per stream, each row's 6 new tokens (+ 1: the step past the
    # last), in whole blocks of 32
    need = streams * -(-(longest - 1) // 32) + rows * -(-7 // 32)
    assert f"| {tb * L * 32 * need / 1e6:,.2f} MB ({need:,} blocks of 32)" in text
    assert f"| {tb * rows * L * (longest + 6) / 1e6:,.2f} MB" in text  # each row its own prompt and new tokens
    with Engine(model, kv_budget_gb=0.02, max_len=longest + 6) as eng:
        assert eng.plan.usable_blocks == blocks and at_once == min(eng.slots // rows, blocks // need) > 1
        assert sum(t.nbytes for t in eng.k + eng.v) == (blocks + 1) * tb * L * 32
        assert sum(t.nbytes for t in eng.k + eng.v) + eng.plan.staging_bytes <= 0.02e9
        list(eng.generate([Group([3 + i % 200 for i in range(longest)], pols)], GenConfig(max_new_tokens=6)))
        assert eng.stats["kv_blocks_peak"] == need
    # a budget under one group: the sizes per group still print, with the reason, and the command fails
    assert main(["niah", "--heads", "1-0,2-1", "--controls", "random", *grid, "--no-progress", "--dtype", "fp32",
                 "--kv-budget-gb", "0.0005", "--plan"]) == 1
    text = capsys.readouterr().out
    assert "not one group fits" in text and "raise --kv-budget-gb" in text
    assert f"| {tb * L * 32 * need / 1e6:,.2f} MB ({need:,} blocks of 32)" in text
    # no --dtype: the plan sizes the dtype the run itself would load (fp32 on a CPU, bf16 on CUDA)
    assert main(["niah", "--heads", "1-0,2-1", "--controls", "random", *grid, "--no-progress", "--device", "cpu",
                 "--kv-budget-gb", "0.02", "--plan"]) == 0
    text = capsys.readouterr().out
    assert "(float32)" in text and f"{blocks:,} blocks, {at_once} group(s) at once" in text
