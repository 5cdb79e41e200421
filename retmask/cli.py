"""The `retmask` command: find retrieval heads, make preference pairs by switching them off, train with
DPO, and check what it changed.

Every command runs offline on the shipped toy model (the default --model); name a local folder or a hub
model (for example meta-llama/Llama-3.1-8B-Instruct) for a real run. Where the toy's defaults differ from
a real model's, the option's help says so."""

from __future__ import annotations

import argparse
import sys

WORKFLOW = """\
the workflow, in order (detect writes the scores that heads, pairs and niah read; train reads the pairs):
  1. detect   score every head with the needle-in-a-haystack retrieval score
              retmask detect --out runs/detect/toy
  2. heads    read the scores' sparsity and pick the heads to switch off
              retmask heads --scores runs/detect/toy/head_scores.json --tau 0.5 --out runs/heads.json
  3. pairs    chosen answers from the original model, rejected from the heads-off one
              retmask pairs --scores runs/detect/toy/head_scores.json --tau 0.5 --out runs/pairs/toy
  4. train    DPO on the pairs (reference = the original model)
              retmask train --pairs runs/pairs/toy --out runs/train/toy
  5. niah     NIAH recall with the heads on and off (after training: --model runs/train/toy/final)
              retmask niah --scores runs/detect/toy/head_scores.json --tau 0.5
     helmet   the HELMET commands that evaluate the trained model at 8K-128K
              retmask helmet runs/train/toy/final

also: `retmask demo` runs steps 1-5 on the toy model (about 20 s on a CPU);
`retmask check-kernels` compares the kernels with their references.
A real model: add --model NAME to each step (a hub name or a local folder), for example
  retmask detect --model meta-llama/Llama-3.1-8B-Instruct --preset retmask --kv-budget-gb 40
`retmask COMMAND --help` lists each command's options and their defaults."""


def _command(sub, name: str, summary: str, examples: str):
    """A subcommand whose --help opens with `summary` and closes with example command lines."""
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                          epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `retmask` command (option names and dests are what `commands` reads)."""
    from . import toy

    parser = argparse.ArgumentParser(prog="retmask", description=__doc__, epilog=WORKFLOW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "detect", "score every head with the needle-in-a-haystack retrieval score",
                 "  retmask detect                               # the toy model, offline: about 9 s on 2 CPU cores\n"
                 "  retmask detect --model meta-llama/Llama-3.1-8B-Instruct --preset 128k --plan --tflops 600\n"
                 "  retmask detect --model meta-llama/Llama-3.1-8B-Instruct --preset 128k --kv-budget-gb 40\n"
                 "  torchrun --nproc_per_node 8 -m retmask.cli detect --model NAME --min-len 4000 --max-len 128000")
    _model_args(p)
    _grid_args(p, steps=50, max_len=50000, lengths=20, depths=10)
    p.add_argument("--preset", choices=["wu", "retmask", "128k"], help="grid lengths of a known run: wu = 1K-50K "
                   "(the reference detector's), retmask = 0-5K (RetMask's runs), 128k = 4K-128K (default: none; "
                   "--min/--max decide)")
    p.add_argument("--score-rule", choices=["reference", "paper"], default="reference",
                   help="rule of head_scores.json and detect.json: reference = 1/|span| per hit step (the reference "
                   "code; may exceed 1), paper = distinct span positions hit / |span| (in [0, 1]); tests.jsonl "
                   "records both (default: %(default)s)")
    p.add_argument("--out", help="output folder (default: runs/detect/MODEL)")
    _run_folder_args(p)
    p.add_argument("--plan", action="store_true", help="print what the grid's prefill costs (tokens, FLOPs, with "
                   "and without prefix reuse) from its prompts and the model's config, and stop: no weights load "
                   "(default: off)")
    p.add_argument("--tflops", type=float, help="with --plan: a sustained bf16 rate (TFLOP/s) you have measured, "
                   "to turn FLOPs into hours (default: none, FLOPs only)")

    p = _command(sub, "heads", "score-table statistics and a head selection (HeadSet JSON)",
                 "  retmask heads --scores runs/detect/toy/head_scores.json\n"
                 "  retmask heads --scores runs/detect/toy --tau 0.5 --out runs/heads.json\n"
                 "  retmask heads --scores runs/detect/toy/head_scores.json --tau 0.5 --control non-retrieval")
    p.add_argument("--scores", required=True, help="score file in the reference format {'L-H': [scores]}, or a "
                   "`retmask detect` folder or its tests.jsonl (both score rules) (required)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="select heads with mean score >= tau (default: no selection, the "
                     "statistics alone; the paper: 0.1 for Llama-3.1, 0.05 for Qwen3 and OLMo-3)")
    sel.add_argument("--topk", type=int, help="select the k best heads (default: no selection)")
    p.add_argument("--control", choices=["random", "non-retrieval"], help="a same-size control set instead: random "
                   "heads, or heads outside the selection (default: none)")
    p.add_argument("--seed", type=int, default=42, help="seed of the control draw (default: %(default)s, the paper's)")
    p.add_argument("--out", help="write the HeadSet JSON here (default: none, print only)")
    p.add_argument("--score-rule", choices=["reference", "paper"], help="which retrieval-score rule to select by "
                   "(default: the one the detect run chose); a head_scores.json holds only its own, a detect folder "
                   "both, and with --tau both rules' selections are compared")

    p = _command(sub, "pairs", "preference pairs: chosen from the original, rejected from the ablated policy",
                 "  retmask pairs --scores runs/detect/toy/head_scores.json --tau 0.5     # toy, bundled instructions\n"
                 "  retmask pairs --model meta-llama/Llama-3.1-8B-Instruct --data lmsys/lmsys-chat-1m \\\n"
                 "                --scores llama.json --tau 0.1 --kv-budget-gb 60 --out runs/pairs/llama\n"
                 "  torchrun --nproc_per_node 8 -m retmask.cli pairs --model NAME --scores FILE --tau 0.1")
    _model_args(p)
    p.add_argument("--data", default=None, help="instructions: hub name or local .jsonl/.json/.parquet "
                   "(default: the bundled synthetic set, retmask/assets/instructions.jsonl: 64 NIAH-style questions)")
    p.add_argument("--split", default="train", help="split of --data (default: %(default)s)")
    p.add_argument("--start", type=int, default=0, help="first row of --data to read (default: %(default)s)")
    p.add_argument("--end", type=int, help="stop before this row (default: none, the end of the data)")
    p.add_argument("--limit", type=int, help="keep at most this many instructions (default: none, all of them)")
    p.add_argument("--scores", help="head score file (reference format; default: none, give --heads instead)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="switch off heads with mean score >= tau (default: none; the paper: "
                     "0.1 Llama, 0.05 Qwen3/OLMo-3)")
    sel.add_argument("--topk", type=int, help="switch off the k best heads (default: none)")
    sel.add_argument("--heads", help="explicit heads to switch off, e.g. '15-30,24-27' (default: none)")
    p.add_argument("--control", choices=["random", "non-retrieval"], help="a same-size control set instead "
                   "(default: none)")
    p.add_argument("--reject-model", help="rejected answers from this model instead: the smaller-model baseline "
                   "(default: none)")
    p.add_argument("--mask-scope", choices=["all", "generated"], default="all", help="where the rejected row's "
                   "heads are off: all = every position (the paper's zeroed-o_proj model), generated = generated "
                   "positions only, the prompt read intact (a different intervention) (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 for greedy (default: "
                   "%(default)s, the paper's)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus cut, 1.0 for none (default: %(default)s, the "
                   "paper's)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per answer at most (default: the paper's 2048, 4096 "
                   f"for Qwen3 with thinking; {toy.PAIRS_MAX_NEW_TOKENS} for the toy model, whose answers take a few). "
                   "The longest prompt (--max-prompt-tokens) plus these must fit the model's context "
                   "(max_position_embeddings)")
    p.add_argument("--thinking", choices=["on", "off"], help="Qwen3 thinking (default: on for a Qwen3 model, as the "
                   "paper; off for others)")
    p.add_argument("--max-prompt-tokens", type=int, help="drop (and count) longer prompts, in chat-templated "
                   "tokens; the slots of a length bucket hold its longest prompt (default 2048; 0: none beyond the "
                   "model's context, less --max-new-tokens)")
    p.add_argument("--seed", type=int, default=42, help="base of the per-instruction seeds, so pairs do not depend "
                   "on batching or process count (default: %(default)s)")
    p.add_argument("--length-buckets", default="512", help="prompt-length edges (tokens, comma-separated; '' for "
                   "none): each bucket gets its own engine, with slots sized for its longest prompt (default: "
                   "%(default)s)")
    p.add_argument("--out", help="output folder (default: runs/pairs/MODEL)")
    _run_folder_args(p)

    p = _command(sub, "train", "DPO with TRL on a pairs folder (reference = the original model)",
                 "  retmask train --pairs runs/pairs/toy                              # toy preset, CPU\n"
                 "  retmask train --model meta-llama/Llama-3.1-8B-Instruct --pairs runs/pairs/llama --max-length 4096\n"
                 "  accelerate launch --config_file retmask/configs/zero3.yaml -m retmask.cli train --model NAME "
                 "--pairs DIR")
    p.add_argument("--model", default="toy", help="'toy', a local folder or a hub name: the model the pairs came "
                   "from (default: %(default)s)")
    p.add_argument("--pairs", required=True, help="folder written by `retmask pairs` (required)")
    p.add_argument("--preset", choices=["paper", "toy"], help="hyper-parameters: paper = beta 0.1, lr 5e-7 cosine "
                   "to 5e-8, effective batch 512, bf16; toy = lr 2e-4, effective batch 8, fp32 (default: toy for "
                   "the toy model, else paper)")
    p.add_argument("--max-length", type=int, help="longest pair in tokens, printed at start (default: the preset's: "
                   "paper 4096, toy 1024)")
    p.add_argument("--lr", type=float, help="peak learning rate; the cosine schedule ends at the preset's floor "
                   "(default: the preset's: paper 5e-7, toy 2e-4)")
    p.add_argument("--epochs", type=float, help="passes over the pairs (default: the preset's, 2 for both)")
    p.add_argument("--effective-batch", type=int, help="pairs per optimizer step, by gradient accumulation "
                   "(default: the preset's: paper 512, toy 8); a run of under 10 optimizer steps is warned about "
                   "before it starts")
    p.add_argument("--per-device-batch", type=int, help="pairs per forward pass on each process; divides "
                   "--effective-batch together with the process count (default: the preset's: paper 1, toy 8)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter, merged into the saved checkpoint "
                   "(default: off, full fine-tuning)")
    p.add_argument("--precompute-ref", action="store_true", help="precompute the reference log-probs in one pass "
                   "before training (default: off)")
    p.add_argument("--liger", action="store_true", help="Liger fused kernels where TRL offers them; needs "
                   "liger-kernel and a CUDA GPU (default: off)")
    p.add_argument("--out", help="output folder (default: runs/train/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (default: "
                   "off; a folder holding a run is refused without --resume or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="delete the training run in --out and start over "
                   "(default: off)")

    p = _command(sub, "niah", "the causal check: NIAH recall of the original and ablated policies",
                 "  retmask niah --scores runs/detect/toy/head_scores.json --tau 0.5\n"
                 "  retmask niah --heads 2-1,3-0 --controls ''\n"
                 "  retmask niah --model meta-llama/Llama-3.1-8B-Instruct --scores llama.json --tau 0.1 \\\n"
                 "               --min 128000 --max 128000 --lengths 1 --kv-budget-gb 86 --plan")
    _model_args(p)
    _grid_args(p, steps=32, max_len=8000, lengths=5, depths=5)
    p.add_argument("--scores", help="head score file (reference format, e.g. from `retmask detect`; default: none)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="switch off heads with mean score >= tau (default: none, the "
                     "original alone)")
    sel.add_argument("--topk", type=int, help="switch off the k best heads (default: none)")
    sel.add_argument("--heads", help="explicit heads to switch off, e.g. '2-1,3-0' (default: none)")
    p.add_argument("--controls", help="controls of the same size, comma-separated ('' for none; default "
                   "random,non-retrieval, or random alone for --heads without --scores)")
    p.add_argument("--scopes", default="all,generated", help="mask scopes of each ablation, comma-separated: all = "
                   "off at every position, generated = off at generated positions only (default: %(default)s)")
    p.add_argument("--plan", action="store_true", help="print the KV cache one group of the policies needs at the "
                   "grid's longest prompt, and the groups --kv-budget-gb holds at once, from the model's config and "
                   "tokenizer, and stop (no weights load; exit status 1 when not one group fits the budget) "
                   "(default: off)")
    p.add_argument("--out", help="output folder (default: runs/niah/MODEL)")
    _run_folder_args(p)

    p = _command(sub, "helmet", "print the HELMET commands that evaluate a checkpoint at 8K-128K",
                 "  retmask helmet runs/train/toy/final\n"
                 "  retmask helmet meta-llama/Llama-3.1-8B-Instruct")
    p.add_argument("checkpoint", help="the model folder `retmask train` wrote (its final/) or a hub name (required)")

    p = _command(sub, "demo", "the whole pipeline on the toy model: detect, pairs, DPO, NIAH before/after",
                 "  retmask demo\n"
                 "  retmask demo --out runs/demo2 --seed 1")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's files; a rerun replaces an earlier "
                   "demo's folder and refuses one holding anything else (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every step (default: %(default)s)")

    p = _command(sub, "check-kernels", "run the kernels against their references and print a table",
                 "  TRITON_INTERPRET=1 retmask check-kernels     # on a CPU, in Triton's interpreter\n"
                 "  retmask check-kernels                        # on a CUDA GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test cases (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands

    try:
        if args.command == "pairs":
            return commands.run_pairs(args)
        if args.command == "train":
            return commands.run_train(args)
        if args.command == "helmet":
            from .train import helmet_commands

            print("\n".join(helmet_commands(args.checkpoint)))
            return 0
        if args.command == "demo":
            from .demo import run as run_demo

            return run_demo(args.out, seed=args.seed)
        if args.command == "detect":
            return commands.run_detect(args)
        if args.command == "niah":
            return commands.run_niah(args)
        if args.command == "check-kernels":
            from .selfcheck import run

            return run(seed=args.seed)
        if args.command == "heads":
            return commands.run_heads(args)
    except ValueError as e:
        print(f"retmask {args.command}: {e}", file=sys.stderr)
        return 2
    finally:
        _dist_close()
    return 2


def _dist_close() -> None:
    """Leave the process group (torchrun / accelerate launch) on the way out, also after an error: the other
    ranks then fail at their next collective instead of waiting out the timeout."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _model_args(p):
    p.add_argument("--model", default="toy", help="'toy' (shipped), a local folder or a hub name (default: "
                   "%(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda when available (under torchrun the local rank's GPU, unless "
                   "--device names another, such as cpu), else cpu")
    p.add_argument("--slots", type=int, help="rows decoded together (default: from --kv-budget-gb; without it, "
                   "70 %% of the GPU memory free after loading, capped at the job's rows; a few on CPU)")
    p.add_argument("--kv-budget-gb", type=float, help="memory (GB) for the KV cache and the staging of a prefill pass; "
                   "the engine sizes its slots to fit (default: none, --slots decides; without either, 70 %% of the "
                   "GPU memory free after the weights load, or a few slots on a CPU)")
    p.add_argument("--chunk", type=int, help="prefill chunk (tokens; default 4096 on CUDA, the whole prompt on a "
                   "CPU, within --prefill-tokens)")
    p.add_argument("--prefill-tokens", type=int, default=32768,
                   help="most rows x tokens one prefill pass holds (bounds its memory; default: %(default)s)")
    p.add_argument("--admit-rows", type=int, help="rows that must be admissible before waiting prompts join "
                   "while others decode (default: slots // 16, at least a group); an admission costs prefill "
                   "passes between decode steps, so fewer, larger admissions cost less")
    p.add_argument("--reuse-prefix", type=int, default=128,
                   help="shortest prompt prefix (tokens) whose KV is copied from an earlier prompt instead of "
                   "computed (NIAH prompts share their haystack up to the needle); 0 = off (default: %(default)s)")
    p.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="decode step: eager = rebuilt every step, static = the same launches every step, graph = "
                   "static captured as a CUDA graph (CUDA only); auto = graph on CUDA, eager elsewhere (default: "
                   "%(default)s). All give the same tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, the bar is shown)")


def _run_folder_args(p):
    p.add_argument("--resume", action="store_true", help="continue the run in --out (default: off; a folder holding "
                   "a run is refused without --resume or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over (default: off)")


def _grid_args(p, steps: int, max_len: int = 50000, lengths: int = 20, depths: int = 10):
    """The NIAH grid's options; `steps`, `max_len`, `lengths` and `depths` are the command's defaults. The toy
    model's grid differs: 128 tokens up to its training length, 4 lengths x 5 depths, a buffer of 32."""
    from . import toy

    on_toy = "; the toy model: {}".format
    p.add_argument("--min", "--min-len", dest="min_len", type=int, default=None,
                   help="shortest context (tokens); under torchrun write --min-len (default: 1000, or --preset's"
                   + on_toy("128") + ")")
    p.add_argument("--max", "--max-len", dest="max_len", type=int, default=None,
                   help=f"longest context (tokens); under torchrun write --max-len (default: {max_len}, or "
                   "--preset's" + on_toy(f"{toy.TRAIN_LEN}, its training length") + ")")
    p.add_argument("--lengths", dest="n_lengths", type=int, help="number of context lengths, round(linspace(min, "
                   f"max)) (default: {lengths}" + on_toy("4") + ")")
    p.add_argument("--depths", dest="n_depths", type=int, help="number of needle depths, linspace(0, 100) (default: "
                   f"{depths}" + on_toy("5") + ")")
    p.add_argument("--needles", dest="n_needles", type=int, help="number of needles, each with its own haystack "
                   "(default: 3)")
    p.add_argument("--needles-file", help="needles JSONL (needle, question, real_needle) (default: none, the "
                   "built-in synthetic needles)")
    p.add_argument("--haystack", help="haystack text file or folder (the reference's partN/ layout works) (default: "
                   "none, the built-in synthetic haystack)")
    p.add_argument("--placement", choices=["sentence", "faithful"], default="sentence", help="where the needle goes: "
                   "sentence = the nearest sentence end at or before the depth, by the model's tokenizer; faithful "
                   "= as the reference does (its Llama-2 period ids put the needle at position 0 for every depth "
                   "below 100 with other tokenizers) (default: %(default)s)")
    p.add_argument("--buffer", type=int, default=None, help="tokens kept free below each length (default: 200"
                   + on_toy("32") + ")")
    p.add_argument("--steps", type=int, default=steps, help="greedy decode steps per test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic needles and haystack (default: "
                   "%(default)s)")


if __name__ == "__main__":
    sys.exit(main())
