"""Pairs, DPO training and the demo on the shipped toy model (CPU)."""

import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retmask import toy
from retmask.data import load_instructions
from retmask.detect import read_jsonl
from retmask.engine import ORIGINAL, EngineConfig, Group
from retmask.heads import HeadSet
from retmask.pairs import PairJob, PairsConfig, chat_prompt, load_pairs

pytestmark = pytest.mark.skipif(not toy.available(), reason="toy model not built")
ROOT = Path(__file__).resolve().parents[1]
DATA = str(toy.ASSET_DIR.parent / "instructions.jsonl")
HEADS = "0-2,0-3,1-2,1-3"


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "retmask.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _gz(folder):
    return b"".join(gzip.open(p).read() for p in sorted(Path(folder).glob("pairs-*.jsonl.gz")))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    model, tok = toy.load()
    out = tmp_path_factory.mktemp("pairs")
    job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12, shard_pairs=7),
                  model_name="toy", engine=EngineConfig(slots=16))
    summary = job.run(load_instructions(DATA, limit=20), out, progress=False)
    return out, summary


def test_pairs_format_and_content(pairs_dir):
    out, s = pairs_dir
    pairs = load_pairs(out)
    assert s["instructions"] == 20 and s["pairs"] == len(pairs) and s["pairs"] + sum(s["dropped"].values()) == 20
    assert len(s["shards"]) == -(-len(pairs) // 7)  # sharded by shard_pairs
    assert 0 < s["slot_utilization"] <= 1
    answers = {json.loads(line)["id"]: json.loads(line)["answer"] for line in open(DATA)}
    right = 0
    for p in pairs:
        assert [m["role"] for m in p["prompt"]] == ["user"]
        assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        assert p["chosen"][0]["content"] and p["chosen"][0]["content"] != p["rejected"][0]["content"]
        m = p["meta"]
        assert m["heads_sha"] == HeadSet.from_list(HEADS).digest() and m["model"] == "toy"
        assert {m["chosen_finish"], m["rejected_finish"]} <= {"eos", "length"}
        right += answers[p["source_id"]] in p["chosen"][0]["content"]
    assert right >= 0.8 * len(pairs)  # the original copies the needle; the ablated one cannot


def test_pairs_do_not_depend_on_batching(pairs_dir, tmp_path):
    out, _ = pairs_dir
    model, tok = toy.load()
    job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12, shard_pairs=7),
                  model_name="toy", engine=EngineConfig(slots=2))
    job.run(load_instructions(DATA, limit=20), tmp_path, progress=False)
    assert _gz(tmp_path) == _gz(out)


def test_length_buckets_size_engines_and_leave_pairs_unchanged(pairs_dir, tmp_path):
    """Each prompt-length bucket gets its own engine, its max_len its longest prompt's: with a KV budget,
    every bucket gets the same pool (KV is taken in blocks as rows grow, whatever max_len is). The pairs
    are the one-engine run's."""
    from retmask.pairs import length_buckets

    out, _ = pairs_dir
    model, tok = toy.load()
    ins = load_instructions(DATA, limit=20)
    lens = sorted(len(chat_prompt(tok, text, False)) for _, text in ins.items)
    edges = (lens[5], lens[12])  # three buckets: 6, 7 and 7 prompts
    job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12, shard_pairs=7),
                  model_name="toy", length_buckets=edges, engine=EngineConfig(kv_budget_gb=0.004))
    job.run(ins, tmp_path, progress=False)
    assert _gz(tmp_path) == _gz(out)
    e = job.engines
    assert [x["prompts_up_to"] for x in e] == [*edges, None] and [x["groups"] for x in e] == [6, 7, 7]
    assert [x["max_len"] for x in e] == [lens[5] + 12, lens[12] + 12, lens[-1] + 12]
    assert e[0]["slots"] == e[1]["slots"] == e[2]["slots"] >= 2
    groups = [Group(list(range(n)), [ORIGINAL]) for n in (5, 1, 9, 3)]
    assert [(edge, [len(g.prompt) for g in gs]) for edge, gs in length_buckets(groups, [3, 8])] == [
        (3, [1, 3]), (8, [5]), (None, [9])]
    assert [len(gs) for _, gs in length_buckets(groups, [])] == [4]
    with pytest.raises(ValueError, match="increasing"):
        PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(), model_name="toy", length_buckets=(8, 3))


ARGS = ["pairs", "--data", DATA, "--limit", "20", "--heads", HEADS, "--max-new-tokens", "12", "--no-progress"]


def test_instruct_models_list_of_eos_ids(tmp_path):
    """Instruct models give generation_config.eos_token_id as a list (Llama-3.1-Instruct: 3 ids): every
    id ends an answer, and pairs run with it."""
    from types import SimpleNamespace

    from retmask import models

    m = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[128001, 128008, 128009]))
    assert models.eos_ids(m, SimpleNamespace(eos_token_id=128009)) == (128001, 128008, 128009)
    assert models.eos_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == ()
    model, tok = toy.load()
    stop = tok.convert_tokens_to_ids("the")  # a common word: answers end early at it
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12), model_name="toy",
                  engine=EngineConfig(slots=8))
    s = job.run(load_instructions(DATA, limit=6), tmp_path / "o", progress=False)
    assert s["instructions"] == 6
    metas = [json.loads(line)["meta"] for line in gzip.open(tmp_path / "o" / "pairs-00000.jsonl.gz", "rt")]
    assert metas and all(x["chosen_finish"] in ("eos", "length") for x in metas)


def test_resume_after_sigkill_and_two_processes(pairs_dir, tmp_path, free_port):
    ref, _ = pairs_dir
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "retmask.cli", *ARGS, "--slots", "2", "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = out / "work" / "rank-00000.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and len(read_jsonl(work)) < 4:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert 4 <= len(read_jsonl(work)) < 20
    r = _cli(*ARGS, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {out}/pairs-00000.jsonl.gz and {out}/summary.json" in r.stdout  # real paths, one shard
    assert "decode steps" in r.stdout and "summed over ranks" not in r.stdout  # one process
    ids = [x["id"] for x in read_jsonl(work)]
    assert sorted(ids) == list(range(20))  # none lost, none twice
    # the same pairs as one uninterrupted run (shard size differs: compare records)
    assert [json.loads(x) for x in _gz(out).splitlines()] == [json.loads(x) for x in _gz(ref).splitlines()]

    ddp = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port), "-m", "retmask.cli", *ARGS, "--out", str(ddp)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decode steps (summed over ranks)" in r.stdout
    assert len(list((ddp / "work").glob("rank-*.jsonl"))) == 2
    assert [json.loads(x) for x in _gz(ddp).splitlines()] == [json.loads(x) for x in _gz(ref).splitlines()]
    s = json.loads((ddp / "summary.json").read_text())  # this run's counts are both ranks'
    assert s["this_run_tokens"] == s["generated_tokens"] and 0 < s["slot_utilization"] <= 1
    assert s["decode_steps"] >= 12 and 2 <= s["prefill_passes"] < s["decode_steps"]  # both ranks ran


def test_resume_with_other_instructions_is_refused(pairs_dir, tmp_path):
    """The instructions are part of a run's configuration: resuming with another slice (same count) fails,
    naming it, instead of keeping the first slice's texts under the ids already done."""
    base = ["pairs", "--heads", HEADS, "--data", DATA, "--limit", "3", "--max-new-tokens", "4", "--slots", "4",
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert _cli(*base).returncode == 0
    r = _cli(*base, "--start", "10", "--resume")
    assert r.returncode == 2 and "instructions_sha" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert _cli(*base, "--resume").returncode == 0  # the same instructions resume
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    del cfg["instructions_sha"]  # as an older retmask wrote it
    (tmp_path / "o" / "config.json").write_text(json.dumps(cfg))
    r = _cli(*base, "--resume")
    assert r.returncode == 2 and "not recorded there: an older retmask wrote it" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["--heads", "9-0"], "head 9-0 does not exist"),  # a heads list for another (deeper) model
    (["--scores", "{scores}", "--tau", "5"], "no head has a mean score >= tau"),
    (["--heads", HEADS, "--out", "{blocked}/x"], "not writable"),
    (["--heads", HEADS, "--data", "{nocols}"], "none holds instructions"),
    (["--heads", HEADS, "--data", "{empty}"], "empty"),
    (["--heads", HEADS, "--length-buckets", "512,256"], "--length-buckets '512,256': give increasing"),
    (["--heads", HEADS, "--length-buckets", "short"], "--length-buckets 'short': give token counts"),
])
def test_bad_inputs_fail_early_with_one_message(tmp_path, args, message):
    (tmp_path / "scores.json").write_text(json.dumps({"0-0": [0.2], "0-1": [0.0]}))
    (tmp_path / "blocked").write_text("a file, not a folder")
    (tmp_path / "nocols.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    fill = {"scores": tmp_path / "scores.json", "blocked": tmp_path / "blocked", "nocols": tmp_path / "nocols.jsonl",
            "empty": tmp_path / "empty.jsonl"}
    args = [a.format(**fill) for a in args]
    base = ["pairs", "--data", DATA, "--limit", "4", "--max-new-tokens", "4", "--out", str(tmp_path / "o")]
    r = _cli(*base, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and "Traceback" not in r.stderr


def test_dpo_checkpoint_reloads_and_generates(pairs_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retmask.train import TrainConfig, train

    out, _ = pairs_dir
    res = train(str(toy.ASSET_DIR), out, tmp_path, TrainConfig.preset("toy", epochs=1.0, effective_batch=4,
                                                                      per_device_batch=4), log=lambda *_: None)
    assert res["metrics"]["rewards/margins"] > 0  # chosen pulled above rejected
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "arrow").is_dir() and not any((tmp_path / "arrow").iterdir())  # the pairs' copy, removed
    before = toy.load()[0]
    m = AutoModelForCausalLM.from_pretrained(res["final"])
    tok = AutoTokenizer.from_pretrained(res["final"])
    changed = any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), before.state_dict().values()))
    assert changed
    ids = tok.apply_chat_template([{"role": "user", "content": json.loads(open(DATA).readline())["messages"][0]
                                    ["content"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    g = m.generate(**ids, max_new_tokens=6, do_sample=False)
    assert g.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.parametrize("name,kind", [("zero3.yaml", "DEEPSPEED"), ("fsdp.yaml", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    """accelerate reads the shipped multi-GPU configs, and every plugin key is one its launcher knows."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    import retmask

    cfg = load_config_from_file(str(Path(retmask.__file__).parent / "configs" / name))  # unknown top keys raise
    assert cfg.distributed_type.name == kind and cfg.mixed_precision == "bf16"
    known = {o for a in launch_command_parser()._actions for o in a.option_strings}
    plugin = cfg.deepspeed_config if kind == "DEEPSPEED" else cfg.fsdp_config
    assert plugin and all(f"--{k}" in known for k in plugin), sorted(k for k in plugin if f"--{k}" not in known)


def test_dpo_two_processes_with_accelerate_launch(pairs_dir, tmp_path, free_port):
    """`accelerate launch` with 2 CPU processes (gloo, DDP): gradient accumulation counts both, the reference
    log-probs precomputed by rank 0 reach rank 1, rank 0 alone reports and writes one checkpoint that reloads."""
    from transformers import AutoModelForCausalLM

    out, _ = pairs_dir
    cfg = tmp_path / "cpu2.yaml"  # MULTI_GPU + use_cpu: accelerate's torchrun launcher, DDP over gloo on CPU
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\n"
                   f"num_processes: 2\nmachine_rank: 0\nmain_process_port: {free_port}\nmixed_precision: 'no'\n"
                   "use_cpu: true\nrdzv_backend: static\nsame_network: true\n")
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "-m",
                        "retmask.cli", "train", "--pairs", str(out), "--out", str(tmp_path / "run"), "--epochs", "1",
                        "--effective-batch", "8", "--per-device-batch", "2", "--precompute-ref"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("effective batch 8 (2 x 2 x 2 accumulation)") == 1, r.stdout[:600]  # world 2, rank 0 speaks
    assert r.stdout.count("parallelism: DDP over 2 processes") == 1
    assert r.stdout.count("wrote ") == 1
    res = json.loads((tmp_path / "run" / "train.json").read_text())
    assert res["pairs"] == 20 and res["metrics"]["rewards/margins"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(res["final"])
    assert loaded.config.num_hidden_layers == toy.CONFIG["num_hidden_layers"]


@pytest.fixture(scope="module")
def single_process_runs(pairs_dir, tmp_path_factory):
    """The oracle of the sharded runs: one process, the same batches by gradient accumulation."""
    from retmask.train import TrainConfig, train

    out, _ = pairs_dir
    runs = {}
    for lora in (False, True):
        cfg = TrainConfig.preset("toy", epochs=1.0, effective_batch=8, per_device_batch=2, lora=lora)
        runs[lora] = train(str(toy.ASSET_DIR), out, tmp_path_factory.mktemp("single"), cfg, log=lambda *_: None,
                           quiet=True)["final"]
    return runs


@pytest.mark.parametrize("config,mode,lora,precompute", [
    ("fsdp.yaml", "FSDP2", False, False), ("fsdp.yaml", "FSDP2", True, True),
    ("zero3.yaml", "DeepSpeed ZeRO-3", False, True), ("zero3.yaml", "DeepSpeed ZeRO-3", True, False)],
    ids=["fsdp-full", "fsdp-lora-precomputed", "zero3-full-precomputed", "zero3-lora"])
def test_shipped_sharded_configs_train_like_one_process(pairs_dir, single_process_runs, tmp_path, free_port, config,
                                                        mode, lora, precompute):
    """The shipped FSDP and ZeRO-3 configs, run by `accelerate launch` with 2 processes on CPU (tests/shims
    makes accelerate take its sharded path over gloo; it otherwise runs DDP without a GPU): the checkpoint,
    gathered from the shards (and merged, with LoRA), equals one process's on the same batches (reference
    log-probs computed along, in the oracle, or precomputed once before training, in half the cases)."""
    import yaml
    from transformers import AutoModelForCausalLM

    import retmask

    if config == "zero3.yaml":
        pytest.importorskip("deepspeed", reason="ZeRO-3 needs the optional deepspeed (pip install -e '.[zero3]')")
    out, _ = pairs_dir
    cfg = yaml.safe_load((Path(retmask.__file__).parent / "configs" / config).read_text())
    cfg.update(num_processes=2, mixed_precision="no", main_process_port=free_port)  # fp32 on CPU
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "tests" / "shims"),
           "RETMASK_SHARDED_ON_CPU": "1", "ACCELERATE_TORCH_DEVICE": "cpu", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "cfg.yaml"),
                        "-m", "retmask.cli", "train", "--pairs", str(out), "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--effective-batch", "8", "--per-device-batch", "2"] +
                       (["--lora"] if lora else []) + (["--precompute-ref"] if precompute else []),
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.count(f"parallelism: {mode} over 2 processes") == 1, r.stdout[-2000:]
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    want = AutoModelForCausalLM.from_pretrained(single_process_runs[lora]).state_dict()
    base = toy.load()[0].state_dict()
    assert got.keys() == want.keys()
    moved = max((want[k] - base[k]).abs().max().item() for k in want)
    assert moved > 1e-4  # training changed the weights, so equality below means something
    # equal up to fp32 rounding: a sharded all-reduce sums in another order, a few ulps of the weights per
    # step (a sharding mistake, such as gradients not averaged, is off by the update itself: 3e-4 here)
    ulps = 16 * torch.finfo(torch.float32).eps * max(want[k].abs().max().item() for k in want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= max(1e-3 * moved, ulps)


def test_train_curves_draw_the_logged_steps(tmp_path):
    from retmask import plots

    hist = [{"step": i + 1, "loss": 0.7 - 0.1 * i, "rewards/chosen": 0.01 * i, "rewards/rejected": -0.2 * i,
             "rewards/margins": 0.21 * i} for i in range(5)] + [{"step": 5, "train_runtime": 1.0}]  # summary row
    drawn = plots.train_curves(hist, tmp_path / "t.png", "t")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert drawn[key] == [(float(h["step"]), pytest.approx(h[key])) for h in hist if key in h]
    assert (tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="empty"):
        plots.train_curves([], tmp_path / "u.png", "u")


def test_few_optimizer_steps_are_warned_with_the_numbers_and_a_fix():
    from retmask.train import TrainConfig, few_steps_warning, plan_steps

    toy_cfg, paper = TrainConfig.preset("toy"), TrainConfig.preset("paper")
    assert plan_steps(64, toy_cfg) == (16, 2) and few_steps_warning(64, toy_cfg) is None  # the bundled set
    assert plan_steps(294_000, paper) == (1150, 115) and few_steps_warning(294_000, paper) is None
    # 8 pairs in one batch a epoch: 2 steps, the first of them warm-up at learning rate 0
    w = few_steps_warning(8, TrainConfig.preset("toy", effective_batch=16))
    assert w.startswith("8 pairs at effective batch 16 (8 per device) for 2 epochs make 2 optimizer steps, 1 of "
                        "them warm-up from learning rate 0: too few to train")
    assert w.endswith("e.g. --effective-batch 1 --per-device-batch 1 makes 16 steps")
    # the suggested batch does make enough steps, at the paper's per-device batch and over 8 processes
    w = few_steps_warning(1000, paper, world=8)
    assert "(1 per device x 8 processes)" in w and w.endswith("e.g. --effective-batch 128 makes 16 steps")
    assert plan_steps(1000, TrainConfig.preset("paper", effective_batch=128), world=8) == (16, 2)
    assert plan_steps(9, TrainConfig.preset("toy", epochs=1.5)) == (3, 1)  # a partial batch, a partial epoch


def test_train_prints_one_bar_and_compact_lines(pairs_dir, tmp_path):
    """`retmask train` shows a labelled bar, one line per logged step and the few-steps warning; none of the
    libraries' per-step dicts, deprecation warnings or other bars. Every log record is in log.jsonl as it is
    logged, and a resume logs the steps after its checkpoint once."""
    import re
    import shutil

    from retmask.train import TrainConfig, train

    out, _ = pairs_dir
    few = tmp_path / "pairs"
    few.mkdir()
    shutil.copy(out / "pairs-00000.jsonl.gz", few)  # 7 pairs: one batch a epoch
    run = tmp_path / "run"
    r = _cli("train", "--pairs", str(few), "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("warning: 7 pairs at effective batch 8 (8 per device) for 2 epochs make 2 optimizer steps, 1 of "
            "them warm-up from learning rate 0: too few to train") in r.stdout
    assert re.findall(r"^dpo step (\d)/2: loss \d\.\d{4}, reward margin -?\d\.\d{4}, lr \S+$", r.stdout,
                      re.M) == ["1", "2"], r.stdout
    assert "dpo:" in r.stderr and "2/2" in r.stderr
    for noise in ("{'loss'", "FutureWarning", "warnings.warn", "Setting accelerator", "Loading weights",
                  "Generating train split", "Writing model shards", "Tokenizing"):
        assert noise not in r.stdout + r.stderr, noise
    recs = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [x["step"] for x in recs] == [1, 2, 2] and "train_runtime" in recs[-1]
    hist = json.loads((run / "train.json").read_text())["history"]
    assert [x["loss"] for x in recs[:2]] == [h["loss"] for h in hist]
    # a crash after step 2 was logged and before its checkpoint: the resume from step 1 logs step 2 again, once
    cfg = TrainConfig.preset("toy", save_steps=1)
    train(str(toy.ASSET_DIR), few, tmp_path / "r", cfg, log=lambda *_: None)
    shutil.rmtree(tmp_path / "r" / "trainer" / "checkpoint-2")
    train(str(toy.ASSET_DIR), few, tmp_path / "r", cfg, log=lambda *_: None, resume=True)
    recs = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert [(x["step"], "loss" in x) for x in recs] == [(1, True), (2, True), (2, False)]


def test_train_refuses_empty_pairs_folder(tmp_path):
    r = _cli("train", "--pairs", str(tmp_path))
    assert r.returncode == 2 and "no pairs" in r.stderr


def test_train_liger_fails_before_loading_anything(pairs_dir, tmp_path):
    out, _ = pairs_dir
    r = _cli("train", "--pairs", str(out), "--out", str(tmp_path / "run"), "--liger")
    assert r.returncode == 2 and "--liger" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_folder_holding_a_run(pairs_dir, tmp_path):
    """A second `retmask train` into a folder holding a run would leave its checkpoints beside the first
    run's, and a later --resume would continue the first one's under the new settings: it is refused
    without --resume (same configuration) or --overwrite (which deletes the run's files)."""
    from retmask.train import prepare_out

    out, _ = pairs_dir
    run = tmp_path / "run"
    (run / "trainer" / "checkpoint-8").mkdir(parents=True)
    (run / "trainer" / "checkpoint-8" / "trainer_state.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"model": "other"}))
    r = _cli("train", "--pairs", str(out), "--out", str(run))
    assert r.returncode == 2 and "already holds a training run (trainer)" in r.stderr, r.stderr[-2000:]
    r = _cli("train", "--pairs", str(out), "--out", str(run), "--resume")
    assert r.returncode == 2 and "different configuration (" in r.stderr and "model" in r.stderr, r.stderr[-2000:]
    assert (run / "trainer" / "checkpoint-8").is_dir()  # nothing touched
    prepare_out(run, {"model": "toy"}, resume=False, overwrite=True)
    assert not (run / "trainer").exists() and json.loads((run / "config.json").read_text()) == {"model": "toy"}
    prepare_out(run, {"model": "other"}, resume=False, overwrite=False)  # nothing held now: a fresh start


def test_helmet_commands(tmp_path):
    """The commands run inside the HELMET checkout the first one makes: a local checkpoint is given by its
    absolute path, and results go to a folder named after the run (every run's checkpoint is `final`)."""
    final = tmp_path / "my run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    r = _cli("helmet", str(final.relative_to(tmp_path)), cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("git clone") and "cd HELMET" in lines[0]
    args = [dict(zip(a[2::2], a[3::2])) for a in map(shlex.split, lines[1:])]  # python eval.py --flag value ...
    assert len(args) == 5 * 7 and all(a["--model_name_or_path"] == str(final) for a in args), lines[:2]
    assert {a["--output_dir"] for a in args} == {f"output/my run-final/{L}" for L in ("8k", "16k", "32k", "64k",
                                                                                      "128k")}
    hub = _cli("helmet", "org/model")
    assert hub.returncode == 0 and "--model_name_or_path org/model " in hub.stdout
    assert "output/org--model/8k" in hub.stdout
    for bad, why in (("runs/train/none/final", "no such folder"), (str(tmp_path / "my run"), "no config.json")):
        r = _cli("helmet", bad)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_demo_end_to_end(tmp_path):
    from retmask.demo import run

    out = tmp_path / "demo"
    assert run(out, n_instructions=24) == 0
    s = json.loads((out / "summary.json").read_text())
    before, after = s["NIAH recall %, original"].split(" -> ")
    assert float(before) >= 95 and float(after) >= 90  # DPO on its own pairs keeps the model working
    assert float(s["NIAH recall %, heads-all"].split(" -> ")[0]) <= 20
    for f in ("detect/head_scores.json", "detect/heads.png", "pairs/summary.json", "train/final/model.safetensors",
              "niah-before/niah.json", "niah-after/niah-original.png"):
        assert (out / f).exists(), f


def test_dpo_lora_with_precomputed_reference(pairs_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from retmask.train import TrainConfig, train

    out, _ = pairs_dir
    cfg = TrainConfig.preset("toy", epochs=1.0, effective_batch=4, per_device_batch=4, lora=True, lora_r=4,
                             precompute_ref=True, learning_rate=1e-3)
    res = train(str(toy.ASSET_DIR), out, tmp_path, cfg, log=lambda *_: None)
    m = AutoModelForCausalLM.from_pretrained(res["final"])  # merged: a plain transformers checkpoint
    assert not any("lora" in k for k in m.state_dict())
    before = toy.load()[0].state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in m.state_dict().items() if k in before)


def test_reject_model_pairs(pairs_dir, tmp_path):
    """--reject-model: chosen from the model, rejected from another model (here the toy with the heads'
    o_proj columns zeroed). Each side keeps its own seed, so both equal the batched run's texts, whose
    ablated rows are that zeroed model."""
    from retmask import hf

    ref, _ = pairs_dir
    model, tok = toy.load()
    other = hf.zeroed_copy(toy.load()[0], HeadSet.from_list(HEADS))
    job = PairJob(model, tok, None, PairsConfig(max_new_tokens=12), model_name="toy", reject=(other, tok),
                  reject_name="toy-zeroed", engine=EngineConfig(slots=8))
    s = job.run(load_instructions(DATA, limit=20), tmp_path, progress=False)
    got = {json.loads(x)["id"]: json.loads(x) for x in _gz(tmp_path).splitlines()}
    want = {json.loads(x)["id"]: json.loads(x) for x in _gz(ref).splitlines()}
    assert s["pairs"] >= 15 and all(p["meta"]["reject_model"] == "toy-zeroed" for p in got.values())
    assert set(got) == set(want)
    for i in got:
        assert got[i]["chosen"] == want[i]["chosen"] and got[i]["rejected"] == want[i]["rejected"]
        assert got[i]["meta"]["seeds"] == want[i]["meta"]["seeds"]


def test_reject_model_resume_keeps_the_first_pass(pairs_dir, tmp_path, monkeypatch):
    """A crash during the rejected pass: the chosen answers are already on disk, so the resume runs only the
    rejected pass, for the pairs not written, and gives the uninterrupted run's pairs."""
    from retmask import hf
    from retmask.pairs import PairJob as Job

    model, tok = toy.load()
    other = hf.zeroed_copy(toy.load()[0], HeadSet.from_list(HEADS))
    ins = load_instructions(DATA, limit=12)

    def job():
        return Job(model, tok, None, PairsConfig(max_new_tokens=12), model_name="toy", reject=(other, tok),
                   reject_name="toy-zeroed", engine=EngineConfig(slots=8))

    job().run(ins, tmp_path / "whole", progress=False)
    real, calls = Job._record, []

    def crash_on_the_fourth(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(Job, "_record", crash_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        job().run(ins, tmp_path / "crash", progress=False)
    monkeypatch.setattr(Job, "_record", real)
    assert len(read_jsonl(tmp_path / "crash" / "work" / "rank-00000.jsonl")) == 3
    assert len(read_jsonl(tmp_path / "crash" / "work" / "chosen-00000.jsonl")) == 12
    passes, gen = [], Job._gen
    monkeypatch.setattr(Job, "_gen", lambda self, m, t, rows, *a, **k: (passes.append((a[2], len(rows))),
                                                                         gen(self, m, t, rows, *a, **k))[1])
    s = job().run(ins, tmp_path / "crash", resume=True, progress=False)
    assert passes == [("rejected", 9)]
    assert _gz(tmp_path / "crash") == _gz(tmp_path / "whole") and s["pairs"] >= 9


def test_prompts_over_the_cap_are_dropped_and_counted(pairs_dir, tmp_path):
    """A prompt over max_prompt_tokens is dropped as `prompt_too_long` before any generation (every
    slot is sized for the longest prompt); the other instructions give the same pairs as without it."""
    from retmask.pairs import chat_prompt

    ref, _ = pairs_dir
    model, tok = toy.load()
    ins = load_instructions(DATA, limit=20)
    lens = [len(chat_prompt(tok, text, False)) for _, text in ins.items]
    cap = sorted(lens)[14]
    long_ids = {i for i, n in enumerate(lens) if n > cap}
    assert 1 <= len(long_ids) <= 5
    job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12, shard_pairs=7,
                                                                    max_prompt_tokens=cap), model_name="toy",
                  engine=EngineConfig(slots=16))
    s = job.run(ins, tmp_path, progress=False)
    assert s["dropped"]["prompt_too_long"] == len(long_ids)
    assert s["pairs"] + sum(s["dropped"].values()) == 20
    got = load_pairs(tmp_path)
    assert not {p["id"] for p in got} & long_ids
    assert got == [p for p in load_pairs(ref) if p["id"] not in long_ids]
    r = _cli(*ARGS, "--max-prompt-tokens", "1", "--out", str(tmp_path / "cli"))  # every prompt is longer
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["dropped"] == {"prompt_too_long": 20}


def test_pairs_fit_the_models_context(pairs_dir, tmp_path):
    """Prompt cap + new tokens past the model's context (max_position_embeddings) is refused when the job is
    made; with no cap (0), the prompts that leave too little room are dropped as too long, the others give
    the pairs they give under a cap. The toy's own default is a short cap, the paper's stays for others."""
    from retmask.pairs import chat_prompt

    ref, _ = pairs_dir
    model, tok = toy.load()
    ins = load_instructions(DATA, limit=20)
    lens = [len(chat_prompt(tok, text, False)) for _, text in ins.items]
    ctx = sorted(lens)[14] + 12  # room for 15 of the 20 prompts beside 12 new tokens
    model.config.max_position_embeddings = ctx
    with pytest.raises(ValueError, match=f"up to 2048 tokens .* more than the context of model 'toy' \\({ctx} tokens"
                                         f".*give a --max-prompt-tokens below {ctx}"):
        PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12), model_name="toy")
    job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=12, shard_pairs=7,
                                                                    max_prompt_tokens=0), model_name="toy",
                  engine=EngineConfig(slots=16))
    s = job.run(ins, tmp_path, progress=False)
    long_ids = {i for i, n in enumerate(lens) if n + 12 > ctx}
    assert s["dropped"]["prompt_too_long"] == len(long_ids) == 5
    assert load_pairs(tmp_path) == [p for p in load_pairs(ref) if p["id"] not in long_ids]
    assert PairsConfig.paper("toy").max_new_tokens == toy.PAIRS_MAX_NEW_TOKENS <= 128
    assert PairsConfig.paper("meta-llama/Llama-3.1-8B-Instruct").max_new_tokens == 2048
    assert PairsConfig.paper("toy", max_new_tokens=7).max_new_tokens == 7


def test_pairs_progress_shows_rows_longest_and_cap(tmp_path, capsys):
    """The pairs bar reports the rows decoding, the longest row so far and the rows that ran to the cap:
    at the end, none decoding and the counts of the rows written."""
    import re

    model, tok = toy.load()
    heads = HeadSet.from_list("0-1,0-2,0-3,1-2,1-3,2-0,2-1")  # the demo's: some ablated rows never say EOS
    job = PairJob(model, tok, heads, PairsConfig(max_new_tokens=12), model_name="toy", engine=EngineConfig(slots=4))
    job.run(load_instructions(DATA, limit=6), tmp_path, progress=True)
    err = capsys.readouterr().err
    last = re.findall(r"(\d+) rows? running, longest (\d+) tok, (\d+) rows? hit the 12 cap", err)[-1]
    recs = [json.loads(line) for line in open(tmp_path / "work" / "rank-00000.jsonl")]
    metas = [r["meta"] for r in recs]
    at_cap = sum((m["chosen_finish"] == "length") + (m["rejected_finish"] == "length") for m in metas)
    longest = max(max(m["chosen_tokens"], m["rejected_tokens"]) for m in metas)
    assert tuple(map(int, last)) == (0, longest, at_cap) and 0 < at_cap < 2 * len(metas)


def test_pairs_merge_reads_records_in_id_order(tmp_path):
    """The merge indexes the rank files and reads the kept records back in id order (never all at once):
    records out of order across files, an id written twice (the last counts), a dropped one and a torn last
    line give the shards a dict-based merge gives."""
    import random

    rng = random.Random(0)
    recs = [{"id": i, "source_id": f"s{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
             "chosen": [{"role": "assistant", "content": f"c{i}"}], "rejected": [{"role": "assistant",
                                                                                  "content": f"r{i}"}],
             "dropped": "identical" if i % 5 == 0 else None,
             "meta": {"prompt_tokens": i, "chosen_tokens": i % 7, "rejected_tokens": 1}} for i in range(23)]
    redo = dict(recs[4], chosen=[{"role": "assistant", "content": "again"}])
    order = list(range(23))
    rng.shuffle(order)
    work = tmp_path / "work"
    work.mkdir()
    with (work / "rank-00000.jsonl").open("w") as f:
        f.writelines(json.dumps(recs[i]) + "\n" for i in order[:12])
        f.write(json.dumps(redo) + "\n")
    with (work / "rank-00001.jsonl").open("w") as f:
        f.writelines(json.dumps(recs[i]) + "\n" for i in order[12:])
        f.write('{"id": 3, "torn')
    job = PairJob(None, None, None, PairsConfig(shard_pairs=4), model_name="m", reject=(None, None), reject_name="r")
    s = job.merge(tmp_path, [("s", "t")] * 23, 0, 1.0)
    final = {r["id"]: r for r in recs}
    final[4] = redo
    kept = [{k: v for k, v in final[i].items() if k != "dropped"} for i in range(23) if final[i]["dropped"] is None]
    assert load_pairs(tmp_path) == kept
    assert s["pairs"] == len(kept) == 18 and s["dropped"] == {"identical": 5}
    assert len(s["shards"]) == 5 and s["generated_tokens"] == sum(i % 7 + 1 for i in range(23))
    (work / "rank-00001.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="have no result"):
        job.merge(tmp_path, [("s", "t")] * 23, 0, 1.0)


def test_dpo_dataset_is_the_pairs_in_arrow(pairs_dir, tmp_path):
    from retmask.train import dpo_dataset

    out, _ = pairs_dir
    ds = dpo_dataset(out, tmp_path / "cache")
    want = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in load_pairs(out)]
    assert ds.to_list() == want
    assert ds.cache_files and all(c["filename"].startswith(str(tmp_path / "cache")) for c in ds.cache_files)
    shared = dpo_dataset(out, tmp_path / "cache2", tmp_path / "shared")  # one process: saved there, loaded back
    assert shared.to_list() == want and (tmp_path / "shared" / "dataset_info.json").is_file()


def test_tokenize_procs(monkeypatch):
    from retmask import train

    monkeypatch.setattr(train.os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.tokenize_procs(500) is None and train.tokenize_procs(294_000) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on the node share its 32 cores
    assert train.tokenize_procs(294_000) == 4
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert train.tokenize_procs(294_000) is None


@pytest.mark.parametrize("scope", ["generated", "all"])
def test_pairs_reuse_a_shared_preamble(tmp_path, scope):
    """Instructions that open with the same long text: the engine copies the preamble's KV instead of
    recomputing it (under scope `all`, the ablated rows' from slots that held ablated rows), and the pairs
    are the ones computed without reuse."""
    model, tok = toy.load()
    texts = [json.loads(line)["messages"][0]["content"] for line in open(DATA)][:6]
    preamble = texts[0].split("</book>")[0] + "</book>"  # one haystack, ahead of each instruction's question
    data = tmp_path / "shared.jsonl"
    data.write_text("".join(json.dumps({"prompt": preamble + t.split("</book>")[-1]}) + "\n" for t in texts))
    runs = {}
    for reuse in (0, 128):
        out = tmp_path / f"reuse{reuse}"
        job = PairJob(model, tok, HeadSet.from_list(HEADS), PairsConfig(max_new_tokens=8, scope=scope),
                      model_name="toy", engine=EngineConfig(slots=4, reuse_prefix=reuse))
        runs[reuse] = job.run(load_instructions(str(data)), out, progress=False), _gz(out)
    (off, pairs_off), (on, pairs_on) = runs[0], runs[128]
    assert pairs_on == pairs_off and on["pairs"] >= 4
    assert off["prompt_tokens_reused"] == 0
    # every prompt but the first reuses the preamble; under scope all, not from a pair admitted with it (4 slots:
    # two pairs at a time), as only groups whose rows all read the prompt intact are prefilled in two passes
    assert on["prompt_tokens_reused"] >= (5 if scope == "generated" else 3) * 128
    assert on["prompt_tokens_computed"] + on["prompt_tokens_reused"] == off["prompt_tokens_computed"]
