"""DPO on the pairs with TRL's DPOTrainer; the reference model is the original model.

Presets: `paper` is RetMask's recipe (beta 0.1 sigmoid; lr 5e-7 cosine down to 5e-8; warmup 10 %;
weight decay 0.1; adam beta2 0.95; 2 epochs; effective batch 512 by gradient accumulation; bf16;
gradient checkpointing). `toy` is a short CPU run for the toy model. The maximum sequence length is
always explicit and printed (the reference silently trained on at most 1024 tokens, TRL's default).
Multi-GPU: `accelerate launch --config_file retmask/configs/zero3.yaml -m retmask.cli train ...`
(or `fsdp.yaml`). The final checkpoint is a plain transformers folder (with LoRA, merged).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .models import load_path
from .runs import read_jsonl

PRESETS = {
    "paper": dict(beta=0.1, loss_type="sigmoid", learning_rate=5e-7, min_lr=5e-8, warmup_ratio=0.1, weight_decay=0.1,
                  adam_beta2=0.95, epochs=2.0, effective_batch=512, per_device_batch=1, bf16=True,
                  gradient_checkpointing=True, max_length=4096),
    # effective batch 8: the 64 bundled instructions make 16 optimizer steps (see MIN_STEPS)
    "toy": dict(beta=0.1, loss_type="sigmoid", learning_rate=2e-4, min_lr=2e-5, warmup_ratio=0.1, weight_decay=0.0,
                adam_beta2=0.95, epochs=2.0, effective_batch=8, per_device_batch=8, bf16=False,
                gradient_checkpointing=False, max_length=1024),
}


@dataclass(frozen=True)
class TrainConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    learning_rate: float = 5e-7
    min_lr: float = 5e-8
    warmup_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta2: float = 0.95
    epochs: float = 2.0
    effective_batch: int = 512
    per_device_batch: int = 1
    bf16: bool = True
    gradient_checkpointing: bool = True
    max_length: int = 4096
    lora: bool = False
    lora_r: int = 16
    precompute_ref: bool = False
    liger: bool = False
    seed: int = 42
    save_steps: int = 500

    def __post_init__(self):
        for flag, name in (("--lr", "learning_rate"), ("--epochs", "epochs")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag} {getattr(self, name):g}: must be > 0")
        for flag, name in (("--effective-batch", "effective_batch"), ("--per-device-batch", "per_device_batch"),
                           ("--max-length", "max_length"), ("save_steps", "save_steps")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} {getattr(self, name)}: must be >= 1")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta}: must be > 0")

    @classmethod
    def preset(cls, name: str, **kw) -> "TrainConfig":
        if name not in PRESETS:
            raise ValueError(f"preset {name!r}: use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})

    def grad_accum(self, world: int) -> int:
        per_step = self.per_device_batch * world
        if self.effective_batch % per_step:
            raise ValueError(f"effective batch {self.effective_batch} is not a multiple of per-device batch "
                             f"{self.per_device_batch} x {world} processes")
        return self.effective_batch // per_step


def dpo_config(cfg: TrainConfig, out: Path, world: int, cpu: bool):
    import dataclasses

    from trl import DPOConfig

    # transformers 5.x renamed gradient checkpointing (the old name, which TRL's config sets, warns)
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return DPOConfig(
        output_dir=str(out / "trainer"), beta=cfg.beta, loss_type=[cfg.loss_type], learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine_with_min_lr",
        # as a rate: the `min_lr` form reads optimizer.defaults, which DeepSpeed's ZeRO-3 optimizer lacks
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr / cfg.learning_rate},
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, adam_beta2=cfg.adam_beta2,
        num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.per_device_batch,
        gradient_accumulation_steps=cfg.grad_accum(world), bf16=cfg.bf16 and not cpu,
        **{ckpt: cfg.gradient_checkpointing}, max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref, use_liger_kernel=cfg.liger, report_to="none",
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed,
        use_cpu=cpu, dataloader_num_workers=0)


def plan_steps(pairs: int, cfg: TrainConfig, world: int = 1) -> tuple[int, int]:
    """(optimizer steps, warm-up steps) of a run over `pairs`, counted as transformers' Trainer counts them:
    each rank's batches, a last partial accumulation per epoch, fractional epochs rounded up."""
    import math

    batches = math.ceil(pairs / (cfg.per_device_batch * world))
    per_epoch = max(math.ceil(batches / cfg.grad_accum(world)), 1)
    steps = math.ceil(cfg.epochs * per_epoch)
    return steps, math.ceil(steps * cfg.warmup_ratio)


MIN_STEPS = 10  # fewer optimizer steps than this barely move a model: warn before training


def few_steps_warning(pairs: int, cfg: TrainConfig, world: int = 1) -> str | None:
    """One line when a run would make too few optimizer steps to train (under MIN_STEPS, or none past its
    warm-up, whose first step has learning rate 0), with its numbers and a fix; None otherwise."""
    steps, warm = plan_steps(pairs, cfg, world)
    if steps >= MIN_STEPS and steps > warm:
        return None
    procs = f" x {world} processes" if world > 1 else ""
    # an example: the largest smaller effective batch that makes enough steps, a power of two (x processes) with
    # a per-device batch that divides it, else a multiple of this per-device batch
    per, top = cfg.per_device_batch * world, cfg.per_device_batch.bit_length() - 1
    tries = [(world << i, 1 << min(i, top)) for i in reversed(range((cfg.effective_batch // world).bit_length()))
             if world << i < cfg.effective_batch]
    tries += [(eb, cfg.per_device_batch) for eb in range(cfg.effective_batch - per, 0, -per)]
    hint = ""
    for eb, pdb in tries:
        n, w = plan_steps(pairs, replace(cfg, effective_batch=eb, per_device_batch=pdb), world)
        if n >= MIN_STEPS and n > w:
            hint = (f"; e.g. --effective-batch {eb}" + (f" --per-device-batch {pdb}" if pdb != cfg.per_device_batch
                                                         else "") + f" makes {n} steps")
            break
    return (f"{pairs} pairs at effective batch {cfg.effective_batch} ({cfg.per_device_batch} per device{procs}) for "
            f"{cfg.epochs:g} epochs make {steps} optimizer step{'s' * (steps != 1)}"
            + (f", {warm} of them warm-up from learning rate 0" if warm else "") +
            f": too few to train; give more pairs, a smaller --effective-batch (a multiple of --per-device-batch"
            f"{procs}) or more --epochs{hint}")


# what a training run writes in its folder (besides config.json and each rank's temporary Arrow copy)
TRAIN_NAMES = ("trainer", "final", "adapter", "dataset", "train.json", "train.png", "log.jsonl")


def prepare_out(out: Path, config: dict, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix with a training run already in `out` unless told how: `resume` (the same configuration;
    training continues from its newest checkpoint) or `overwrite` (its files are deleted). Every process of a
    launch checks; the first (RANK 0) deletes and writes config.json."""
    from . import runs

    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    runs.check_writable(out, keep=True)
    config = json.loads(json.dumps(config))
    held = [out / n for n in TRAIN_NAMES if runs.holds_data(out / n)]
    if held and not (resume or overwrite):
        raise ValueError(f"{out} already holds a training run ({', '.join(p.name for p in held)}); pass --resume to "
                         "continue it from its newest checkpoint or --overwrite to start over")
    cfg_path = out / "config.json"
    if resume and held and cfg_path.is_file():
        runs.check_same_config(out, json.loads(cfg_path.read_text()), config, "a training run")
    if int(os.environ.get("RANK", "0")) == 0:
        for p in held if overwrite else ():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        tmp = cfg_path.with_name("config.json.tmp")
        tmp.write_text(json.dumps(config, indent=1) + "\n")
        os.replace(tmp, cfg_path)


def train(model_path: str, pairs_dir: str | Path, out: str | Path, cfg: TrainConfig, *, resume: bool = False,
          overwrite: bool = False, log=print, quiet: bool = False) -> dict:
    """Run DPO; returns {"final": path, "metrics": last logged values, "history": log history}. An existing run
    in `out` is continued (`resume`, same configuration) or replaced (`overwrite`), never mixed in silently.
    On the terminal: one progress bar ("dpo") and, unless `quiet`, one line per logged step (step, loss,
    reward margin, learning rate); every log record goes whole to `out/log.jsonl` as it is logged."""
    with _library_output():
        return _train(model_path, pairs_dir, out, cfg, resume=resume, overwrite=overwrite, log=log, quiet=quiet)


@contextlib.contextmanager
def _library_output():
    """The libraries' own output during a training run cut to what tells the user something: no bars for
    steps of seconds (building the dataset, loading and saving weights; `_train` shows the tokenization's
    bar on a large dataset), no FutureWarning about the gradient-checkpointing names the libraries use
    among themselves, and no DeepSpeed note that a machine without a GPU runs on the CPU. Restored on exit."""
    import logging
    import warnings

    import datasets
    from transformers.utils import logging as tf_logging

    ds_off, tf_on = datasets.are_progress_bars_disabled(), tf_logging.is_progress_bar_enabled()
    cpu_note = lambda r: not str(r.msg).startswith("Setting accelerator to CPU")  # noqa: E731  (a logging filter)
    ds_logger = logging.getLogger("DeepSpeed")  # its handler is set when deepspeed loads; a filter stays
    datasets.disable_progress_bars()
    tf_logging.disable_progress_bar()
    ds_logger.addFilter(cpu_note)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        (datasets.disable_progress_bars if ds_off else datasets.enable_progress_bars)()
        (tf_logging.enable_progress_bar if tf_on else tf_logging.disable_progress_bar)()
        ds_logger.removeFilter(cpu_note)


def progress_callback(path: Path, lines: bool = True):
    """A trainer callback in place of transformers' bar and log printer: one bar labelled "dpo" and, with
    `lines`, one compact line per log with a loss (step, loss, reward margin, learning rate) above it. Every
    log record goes whole to `path` (JSON lines with the step, appended as logged); a resumed run first
    drops the records past its checkpoint's step, which it logs again."""
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    class DPOProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.current_step = state.global_step
            if not state.is_world_process_zero:
                return
            logged = read_jsonl(path) if path.is_file() else []  # a line torn by a crash is left out
            path.write_text("".join(json.dumps(r) + "\n" for r in logged if r.get("step", 0) <= state.global_step))
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="dpo", unit="step",
                                     dynamic_ncols=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            with path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
            if lines and self.training_bar is not None and "loss" in logs:
                nan = float("nan")
                self.training_bar.write(
                    f"dpo step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, reward margin "
                    f"{logs.get('rewards/margins', nan):.4f}, lr {logs.get('learning_rate', nan):.3g}")

    return DPOProgress()


def _train(model_path, pairs_dir, out, cfg: TrainConfig, *, resume: bool, overwrite: bool, log, quiet: bool) -> dict:
    import torch
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from .pairs import iter_pairs

    out = Path(out)
    if next(iter_pairs(pairs_dir), None) is None:
        raise ValueError(f"{pairs_dir} holds no pairs (all dropped?): nothing to train on")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) != 0:  # one process speaks
        log = lambda *_a, **_k: None  # noqa: E731
    cpu = not torch.cuda.is_available()
    if cfg.liger:  # before any model is loaded: transformers would fail only once training starts
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("--liger needs the liger-kernel package: pip install liger-kernel (or drop --liger)")
        if cpu:
            raise ValueError("--liger: Liger's kernels run on CUDA GPUs only; drop --liger on this machine")
    prepare_out(out, {"model": str(model_path), "pairs": str(Path(pairs_dir).resolve()), **asdict(cfg)},
                resume=resume, overwrite=overwrite)
    if cpu and cfg.bf16:
        cfg = replace(cfg, bf16=False)
    args = dpo_config(cfg, out, world, cpu)
    # this rank's Arrow copy of the pairs, memory-mapped from the output folder's disk (a temporary folder
    # can be RAM); a previous run's copy is replaced, and this one is removed once training is done
    arrow = out / "arrow" / f"rank-{int(os.environ.get('RANK', '0')):05d}"
    shutil.rmtree(arrow, ignore_errors=True)
    ds = dpo_dataset(pairs_dir, arrow, out / "dataset" if cfg.precompute_ref else None)
    args.dataset_num_proc = tokenize_procs(len(ds))
    if len(ds) >= TOKENIZE_BAR_ROWS:  # TRL's tokenization takes a while from here: its bar says how long
        import datasets

        datasets.enable_progress_bars()
    steps, warm = plan_steps(len(ds), cfg, world)
    log(f"DPO: {len(ds)} pairs, max_length={cfg.max_length} tokens (longer pairs are truncated), "
        f"beta={cfg.beta} {cfg.loss_type}, lr {cfg.learning_rate:g} -> {cfg.min_lr:g}, effective batch "
        f"{cfg.effective_batch} ({cfg.per_device_batch} x {world} x {args.gradient_accumulation_steps} accumulation), "
        f"{steps} optimizer steps ({warm} warm-up)")
    few = few_steps_warning(len(ds), cfg, world)
    if few:
        log(f"warning: {few}")
    load = load_path(str(model_path))  # offline, a hub name's cached snapshot (the record keeps the name)
    tok = AutoTokenizer.from_pretrained(load)
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=load, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    log(f"parallelism: {parallel_mode(trainer.accelerator)}")
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback, DEFAULT_PROGRESS_CALLBACK):  # each step's log dict, printed
        trainer.remove_callback(cb)
    trainer.add_callback(progress_callback(out / "log.jsonl", lines=not quiet))
    ckpt = None
    if resume:
        cks = sorted((out / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        ckpt = str(cks[-1]) if cks else None
        if ckpt is None:
            log(f"--resume: no checkpoint in {out / 'trainer'} yet (one is saved every {cfg.save_steps} optimizer "
                "steps); training starts from step 0")
    trainer.train(resume_from_checkpoint=ckpt)
    shutil.rmtree(arrow, ignore_errors=True)
    final = out / "final"
    if cfg.lora:
        # Every rank saves (it gathers ZeRO-3 / FSDP shards of the adapter; rank 0 writes it); rank 0 then merges
        # it into a fresh copy of the base model on the CPU. Merging the trained model in place would run a
        # sharded layer's collectives on rank 0 alone, which fails or hangs under FSDP and ZeRO-3.
        trainer.save_model(str(out / "adapter"))
        if trainer.is_world_process_zero():
            merge_adapter(load, out / "adapter", final)
    else:
        trainer.save_model(str(final))  # gathers ZeRO-3 / FSDP shards into one checkpoint
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        tok.save_pretrained(final)
        hist = trainer.state.log_history
        steps = [h for h in hist if "loss" in h]
        metrics = {k: v for k, v in (steps[-1] if steps else {}).items() if isinstance(v, (int, float))}
        first = {k: v for k, v in (steps[0] if steps else {}).items() if isinstance(v, (int, float))}
        res = {"final": str(final), "config": asdict(cfg), "pairs": len(ds), "first": first, "metrics": metrics,
               "history": steps}
        (out / "train.json").write_text(json.dumps(res, indent=1) + "\n")
        if steps:
            from . import plots

            plots.train_curves(steps, out / "train.png", f"DPO on {len(ds)} pairs: {Path(model_path).name}")
        return res
    return {"final": str(final)}


TOKENIZE_BAR_ROWS = 10_000  # pairs from which TRL's tokenization takes long enough to show its bar


def tokenize_procs(rows: int, min_rows: int = 10_000) -> int | None:
    """Processes for TRL's tokenization of the pairs (one per core this rank has, at most 8; None, one,
    below `min_rows`, where starting them costs more than it saves). 294K pairs take minutes in one."""
    if rows < min_rows:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = min(8, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // local)
    return n if n > 1 else None


def _dpo_rows(folder: str):
    from .pairs import iter_pairs

    for r in iter_pairs(folder):
        yield {k: r[k] for k in ("prompt", "chosen", "rejected")}


def dpo_dataset(pairs_dir: str | Path, cache_dir: str | Path, shared: Path | None = None):
    """The pairs as TRL's conversational preference dataset, streamed from the shards into Arrow files
    under `cache_dir` (memory-mapped: a paper-scale run's 294K pairs are never Python objects at once).

    With `shared` (precomputed reference log-probs), the main process builds it and saves it there and
    every rank loads it from there. TRL caches the log-probs next to the dataset's files and has the
    other ranks read that file: a dataset in each process's own folder would hide it from them. With
    several nodes, `shared` must be on a filesystem they all see (TRL's cache needs it anyway)."""
    from datasets import Dataset, Features, Value, load_from_disk

    turn = [{"role": Value("string"), "content": Value("string")}]
    features = Features({"prompt": turn, "chosen": turn, "rejected": turn})

    def build():
        from datasets.exceptions import DatasetGenerationError

        try:
            return Dataset.from_generator(_dpo_rows, gen_kwargs={"folder": str(pairs_dir)}, features=features,
                                          cache_dir=str(cache_dir))
        except DatasetGenerationError as e:  # our own clear error (a damaged shard) comes wrapped
            if isinstance(e.__cause__, ValueError):
                raise e.__cause__ from None
            raise

    if shared is None:
        return build()
    from accelerate import PartialState

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(shared, ignore_errors=True)  # a previous run's copy and its cached log-probs
            build().save_to_disk(str(shared))
        return load_from_disk(str(shared))


def parallel_mode(accelerator) -> str:
    """How accelerate spreads training: one process, DDP, FSDP (version) or DeepSpeed ZeRO (stage)."""
    kind, n = accelerator.distributed_type.name, accelerator.num_processes
    if kind == "FSDP":
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version} over {n} processes"
    if kind == "DEEPSPEED":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage} over {n} processes"
    if n == 1:
        return "one process"
    return f"DDP over {n} processes" if kind.startswith("MULTI_") else f"{kind} over {n} processes"


def merge_adapter(base: str, adapter: str | Path, out: str | Path) -> None:
    """Load `base` on the CPU in its own dtype, merge the LoRA adapter saved in `adapter` into it and save
    a plain transformers checkpoint in `out`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # no deepspeed needed to import

    # training is over: a ZeRO-3 trainer's config would make from_pretrained partition across ranks, and this
    # runs on rank 0 alone
    unset_hf_deepspeed_config()
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", device_map=None)
    PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().save_pretrained(out, safe_serialization=True)


HELMET_LENGTHS = ("8k", "16k", "32k", "64k", "128k")


def helmet_commands(checkpoint: str, lengths=HELMET_LENGTHS) -> list[str]:
    """Shell commands that evaluate `checkpoint` (a local model folder, such as the `final/` that `retmask
    train` writes, or a hub name) with HELMET (github.com/princeton-nlp/HELMET, not vendored) at each
    length. They run from the HELMET checkout the first command makes, so a local folder is given by its
    absolute path; each checkpoint's results go to their own `output/NAME/` (a folder's parent and name,
    as `llama-final`, since every training run's checkpoint is called `final`)."""
    import shlex

    p = Path(checkpoint)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"checkpoint {checkpoint}: no config.json there; give the model folder (the final/ "
                             "that `retmask train` writes)")
        ck, name = str(p.resolve()), f"{p.resolve().parent.name}-{p.resolve().name}"
    elif checkpoint.count("/") == 1 and not checkpoint.startswith((".", "/", "~")):
        ck, name = checkpoint, checkpoint.replace("/", "--")
    else:
        raise ValueError(f"checkpoint {checkpoint}: no such folder; give the model folder `retmask train` wrote "
                         "(its final/) or a hub name such as meta-llama/Llama-3.1-8B-Instruct")
    cmds = ["git clone https://github.com/princeton-nlp/HELMET && cd HELMET && pip install -r requirements.txt"]
    for L in lengths:
        for task in ("recall", "rag", "rerank", "cite", "longqa", "summ", "icl"):
            cmds.append(f"python eval.py --config configs/{task}.yaml "
                        f"--model_name_or_path {shlex.quote(ck)} --input_max_length {int(L[:-1]) * 1024} "
                        f"--output_dir {shlex.quote(f'output/{name}/{L}')} --use_chat_template True")
    return cmds
