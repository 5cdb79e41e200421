"""The `retmask` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import toy

    parser = argparse.ArgumentParser(prog="retmask", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-kernels", help="run the kernels against their references and print a table")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("demo", help="the whole pipeline on the toy model: detect, pairs, DPO, NIAH before/after")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("heads", help="score-table statistics and a head selection (HeadSet JSON)")
    p.add_argument("--scores", required=True, help="score file in the reference format {'L-H': [scores]}, or a "
                   "`retmask detect` folder or its tests.jsonl (both score rules)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="select heads with mean score >= tau")
    sel.add_argument("--topk", type=int, help="select the k best heads")
    p.add_argument("--control", choices=["random", "non-retrieval"], help="a same-size control set instead")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="write the HeadSet JSON here")
    p.add_argument("--score-rule", choices=["reference", "paper"], help="which retrieval-score rule to select by "
                   "(default: the one the detect run chose); a head_scores.json holds only its own, a detect folder "
                   "both, and with --tau both rules' selections are compared")
    p = sub.add_parser("detect", help="score every head with the needle-in-a-haystack retrieval score")
    _model_args(p)
    _grid_args(p, steps=50)
    p.add_argument("--preset", choices=["wu", "retmask", "128k"], help="grid lengths of a known run")
    p.add_argument("--score-rule", choices=["reference", "paper"], default="reference",
                   help="rule of head_scores.json and detect.json: reference = 1/|span| per hit step (the reference "
                   "code; may exceed 1), paper = distinct span positions hit / |span| (in [0, 1]); tests.jsonl "
                   "records both")
    p.add_argument("--out", help="output folder (default runs/detect/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.add_argument("--plan", action="store_true", help="print what the grid's prefill costs (tokens, FLOPs, with "
                   "and without prefix reuse) from its prompts and the model's config, and stop (no weights load)")
    p.add_argument("--tflops", type=float, help="with --plan: a sustained bf16 rate (TFLOP/s) to turn FLOPs into hours")
    p = sub.add_parser("niah", help="the causal check: NIAH recall of the original and ablated policies")
    _model_args(p)
    _grid_args(p, steps=32)
    p.add_argument("--scores", help="head score file (reference format, e.g. from `retmask detect`)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="switch off heads with mean score >= tau")
    sel.add_argument("--topk", type=int, help="switch off the k best heads")
    sel.add_argument("--heads", help="explicit heads to switch off, e.g. '2-1,3-0'")
    p.add_argument("--controls", help="controls of the same size, comma-separated ('' for none; default "
                   "random,non-retrieval, or random alone for --heads without --scores)")
    p.add_argument("--scopes", default="all,generated", help="mask scopes of each ablation")
    p.add_argument("--plan", action="store_true", help="print the KV cache one group of the policies needs at the "
                   "grid's longest prompt, and the groups --kv-budget-gb holds at once, from the model's config and "
                   "tokenizer, and stop (no weights load; exit status 1 when not one group fits the budget)")
    p.add_argument("--out", help="output folder (default runs/niah/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p = sub.add_parser("pairs", help="preference pairs: chosen from the original, rejected from the ablated policy")
    _model_args(p)
    p.add_argument("--data", default=None, help="instructions: hub name or local .jsonl/.json/.parquet "
                   "(default: the bundled synthetic set)")
    p.add_argument("--split", default="train")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--end", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--scores", help="head score file (reference format)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--tau", type=float, help="switch off heads with mean score >= tau (paper: 0.1 Llama, 0.05 "
                     "Qwen3/OLMo-3)")
    sel.add_argument("--topk", type=int)
    sel.add_argument("--heads", help="explicit heads, e.g. '15-30,24-27'")
    p.add_argument("--control", choices=["random", "non-retrieval"], help="a same-size control set instead")
    p.add_argument("--reject-model", help="rejected answers from this model instead (smaller-model baseline)")
    p.add_argument("--mask-scope", choices=["all", "generated"], default="all")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, help="new tokens per answer at most (default: the paper's 2048, 4096 "
                   f"for Qwen3 with thinking; {toy.PAIRS_MAX_NEW_TOKENS} for the toy model, whose answers take a few). The "
                   "longest prompt "
                   "(--max-prompt-tokens) plus these must fit the model's context (max_position_embeddings)")
    p.add_argument("--thinking", choices=["on", "off"], help="Qwen3 thinking (paper: on)")
    p.add_argument("--max-prompt-tokens", type=int, help="drop (and count) longer prompts, in chat-templated "
                   "tokens; the slots of a length bucket hold its longest prompt (default 2048; 0: none beyond the model's context, "
                   "less --max-new-tokens)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--length-buckets", default="512", help="prompt-length edges (tokens, comma-separated; '' for "
                   "none): each bucket gets its own engine, with slots sized for its longest prompt")
    p.add_argument("--out", help="output folder (default runs/pairs/MODEL)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("train", help="DPO with TRL on a pairs folder (reference = the original model)")
    p.add_argument("--model", default="toy", help="'toy', a local folder or a hub name")
    p.add_argument("--pairs", required=True, help="folder written by `retmask pairs`")
    p.add_argument("--preset", choices=["paper", "toy"], help="default: toy for the toy model, else paper")
    p.add_argument("--max-length", type=int, help="longest pair in tokens (printed; paper preset 4096)")
    p.add_argument("--lr", type=float, help="peak learning rate (paper preset 5e-7, toy 2e-4)")
    p.add_argument("--epochs", type=float, help="passes over the pairs (both presets 2)")
    p.add_argument("--effective-batch", type=int, help="pairs per optimizer step, by gradient accumulation (paper "
                   "preset 512, toy 8); a run of under 10 optimizer steps is warned about before it starts")
    p.add_argument("--per-device-batch", type=int, help="pairs per forward pass on each process; divides "
                   "--effective-batch together with the process count (paper preset 1, toy 8)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (merged into the saved checkpoint)")
    p.add_argument("--precompute-ref", action="store_true", help="precompute the reference log-probs")
    p.add_argument("--liger", action="store_true", help="Liger fused kernels (where TRL offers them)")
    p.add_argument("--out", help="output folder (default runs/train/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete the training run in --out and start over")
    p = sub.add_parser("helmet", help="print the HELMET commands that evaluate a checkpoint at 8K-128K")
    p.add_argument("checkpoint")
    args = parser.parse_args(argv)
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
    p.add_argument("--model", default="toy", help="'toy' (shipped), a local folder or a hub name")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda when available (under torchrun the local rank's GPU, unless "
                   "--device names another, such as cpu), else cpu")
    p.add_argument("--slots", type=int, help="rows decoded together (default: from --kv-budget-gb; without it, "
                   "70 %% of the GPU memory free after loading, capped at the job's rows; a few on CPU)")
    p.add_argument("--kv-budget-gb", type=float, help="KV-cache memory the engine may use")
    p.add_argument("--chunk", type=int, help="prefill chunk (tokens; default 4096 on CUDA, the whole prompt on a "
                   "CPU, within --prefill-tokens)")
    p.add_argument("--prefill-tokens", type=int, default=32768,
                   help="most rows x tokens one prefill pass holds (bounds its memory)")
    p.add_argument("--admit-rows", type=int, help="rows that must be admissible before waiting prompts join "
                   "while others decode (default: slots // 16, at least a group); an admission costs prefill "
                   "passes between decode steps, so fewer, larger admissions cost less")
    p.add_argument("--reuse-prefix", type=int, default=128,
                   help="shortest prompt prefix (tokens) whose KV is copied from an earlier prompt instead of "
                   "computed (NIAH prompts share their haystack up to the needle); 0 = off")
    p.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="decode step: auto = a CUDA graph on CUDA, eager elsewhere")
    p.add_argument("--no-progress", action="store_true")


def _grid_args(p, steps: int):
    p.add_argument("--min", "--min-len", dest="min_len", type=int, default=None,
                   help="shortest context (tokens); under torchrun write --min-len")
    p.add_argument("--max", "--max-len", dest="max_len", type=int, default=None,
                   help="longest context (tokens); under torchrun write --max-len")
    p.add_argument("--lengths", dest="n_lengths", type=int, help="number of context lengths (linspace)")
    p.add_argument("--depths", dest="n_depths", type=int, help="number of depths (linspace 0..100)")
    p.add_argument("--needles", dest="n_needles", type=int, help="number of needles (default 3)")
    p.add_argument("--needles-file", help="needles JSONL (needle, question, real_needle)")
    p.add_argument("--haystack", help="haystack text file or folder (the reference's partN/ layout works)")
    p.add_argument("--placement", choices=["sentence", "faithful"], default="sentence")
    p.add_argument("--buffer", type=int, default=None, help="tokens kept free below each length (default 200; "
                   "32 on the toy model)")
    p.add_argument("--steps", type=int, default=steps, help="greedy decode steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic needles and haystack")


if __name__ == "__main__":
    sys.exit(main())
