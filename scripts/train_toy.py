"""Train the toy model (retmask/assets/toy/): a small Llama that answers synthetic NIAH prompts by
copying the needle's four code words from the context, so that a few heads become retrieval heads.

Every training example is a real NIAH prompt built by `retmask.niah` (the same chat template, book
wrapper and sentence placement that detection uses) followed by the answer. The loss is the usual
next-token loss over the whole sequence plus the mean loss over the answer tokens. Context lengths
follow a curriculum: short contexts first (where attention is not yet diluted and the copy circuit
forms), then up to --max-len. Deterministic for a given --seed on CPU.

    python scripts/train_toy.py --out retmask/assets/toy          # ~40 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from retmask import niah, synth, toy


def example(tok, rng: random.Random, max_len: int, copies: int = 1, min_len: int = 40) -> tuple[list[int], int]:
    """(token ids, index where the answer starts) of one training example. `copies` > 1 repeats the
    needle at random sentence ends (early in the curriculum: a strong signal for the copy circuit)."""
    nd = synth.needle(rng.randrange(1 << 30))
    length = rng.randint(min_len, max(min_len, max_len))
    hay = synth.haystack(length + 60, seed=rng.randrange(1 << 30))
    if copies > 1:
        sents = hay.split(" . ")
        for _ in range(copies - 1):
            sents.insert(rng.randrange(len(sents) + 1), nd.needle[:-2])
        hay = " . ".join(sents)
    depth = rng.uniform(0, 100)
    p = niah.prompt_ids(tok, hay, nd, length, depth, buffer=0)
    ans = tok(toy.answer_text(nd), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + ans, len(p)


def batch(tok, rng, n, max_len, max_copies=1):
    exs = [example(tok, rng, max_len, rng.randint(1, max_copies)) for _ in range(n)]
    T = max(len(x) for x, _ in exs)
    ids = torch.full((n, T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    ans = torch.zeros(n, T, dtype=torch.bool)  # positions whose *target* is an answer token
    for i, (x, a) in enumerate(exs):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        ans[i, a - 1: len(x) - 1] = True
    return ids, mask, ans


def losses(model, ids, mask, ans):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
    tgt = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")  # (B, T-1)
    valid = mask[:, 1:].bool()
    a = ans[:, :-1]
    lm = nll[valid].mean()
    al = nll[a].mean()
    hit = (logits.argmax(-1) == tgt) | ~a
    exact = hit.all(-1).float().mean()  # every answer token right under teacher forcing
    return lm, al, exact


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(toy.ASSET_DIR))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--max-len", type=int, default=512, help="longest training context (tokens)")
    ap.add_argument("--tokens-per-batch", type=int, default=3072)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=1000, help="write a checkpoint every N steps")
    ap.add_argument("--layers", type=int, default=toy.CONFIG["num_hidden_layers"])
    ap.add_argument("--heads", type=int, default=toy.CONFIG["num_attention_heads"])
    ap.add_argument("--kv-heads", type=int, default=toy.CONFIG["num_key_value_heads"])
    ap.add_argument("--head-dim", type=int, default=toy.CONFIG["head_dim"])
    ap.add_argument("--rope-theta", type=float, default=toy.CONFIG["rope_parameters"]["rope_theta"])
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = toy.build_tokenizer()
    from transformers import LlamaForCausalLM

    cfg = toy.build_config(tok, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                           rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, args.steps // 30)

    def lr_at(s):
        if s < warm:
            return args.lr * (s + 1) / warm
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))

    def len_at(s):  # curriculum: 64 tokens -> max-len over the first half
        f = min(1.0, s / (0.5 * args.steps))
        return int(64 + f * (args.max_len - 64))

    def copies_at(s):  # curriculum: up to 6 copies of the needle -> 1 over the first tenth
        return max(1, round(6 - 5 * s / (0.1 * args.steps)))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy model: {n_params / 1e6:.2f} M parameters, vocab {len(tok)}, {args.steps} steps")
    t0 = time.time()
    hist = []
    for s in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        L = len_at(s)
        ids, mask, ans = batch(tok, rng, max(4, args.tokens_per_batch // (L + 40)), L, copies_at(s))
        model.train()
        lm, al, exact = losses(model, ids, mask, ans)
        loss = lm + al
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append((lm.item(), al.item(), exact.item()))
        if (s + 1) % args.log_every == 0 or s == 0:
            k = hist[-args.log_every:]
            m = [sum(x[i] for x in k) / len(k) for i in range(3)]
            print(f"step {s + 1:5d}  len<={L:4d} x{copies_at(s)}  lm {m[0]:.3f}  answer {m[1]:.3f}  exact {m[2]:.2f}  "
                  f"lr {lr_at(s):.1e}  {time.time() - t0:6.0f}s", flush=True)

        if args.save_every and (s + 1) % args.save_every == 0 and s + 1 < args.steps:
            save(model, tok, Path(args.out), args, hist, n_params, t0)
    save(model, tok, Path(args.out), args, hist, n_params, t0)
    print(f"wrote {args.out}")


def save(model, tok, out: Path, args, hist, n_params, t0):
    out.mkdir(parents=True, exist_ok=True)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    model.save_pretrained(out, safe_serialization=True)
    model.config._attn_implementation = impl
    tok.save_pretrained(out)
    k = hist[-200:]
    (out / "training.json").write_text(json.dumps({
        "script": "scripts/train_toy.py", "args": vars(args), "parameters": n_params,
        "seconds": round(time.time() - t0), "final_lm_loss": sum(x[0] for x in k) / len(k),
        "final_answer_loss": sum(x[1] for x in k) / len(k), "final_exact": sum(x[2] for x in k) / len(k),
        "steps_done": len(hist), "torch": torch.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
