"""Loading a model and its tokenizer by name: "toy" (the shipped toy model), a local folder, or a
Hugging Face hub name (downloaded only when the user names it)."""

from __future__ import annotations

from pathlib import Path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(name: str, *, dtype: str | None = None, device: str | None = None):
    """(model, tokenizer), the model in eval mode. dtype: "bf16", "fp16", "fp32" or None (bf16 on CUDA,
    fp32 on CPU)."""
    import torch

    from . import toy

    device = device or default_device()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
    if dtype not in dt:
        raise ValueError(f"dtype={dtype!r}: use bf16, fp16 or fp32")
    torch_dtype = dt[dtype] or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if name == toy.NAME or Path(name).resolve() == toy.ASSET_DIR.resolve():
        return toy.load(dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(name).exists() and ("/" not in name or name.startswith((".", "/"))):
        raise ValueError(f"model {name!r}: no such folder; give 'toy', a local folder or a hub name like "
                         "meta-llama/Llama-3.1-8B-Instruct")
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="eager")
    return model.to(device).eval(), tok


def display_name(name: str) -> str:
    return Path(name).name if Path(name).exists() else name.replace("/", "--")


def check_heads(name: str, heads) -> None:
    """Validate a HeadSet against the model's config alone (before any weights are loaded)."""
    from . import toy

    if heads is None:
        return
    if name == toy.NAME:
        n_layers, n_heads = toy.CONFIG["num_hidden_layers"], toy.CONFIG["num_attention_heads"]
    else:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(name)
        c = getattr(c, "text_config", c)
        n_layers, n_heads = c.num_hidden_layers, c.num_attention_heads
    heads.validate(n_layers, n_heads)


def eos_ids(model, tok) -> tuple[int, ...]:
    """The token ids that end an answer: the tokenizer's EOS and the model's generation-config EOS,
    which instruct models give as a list (Llama-3.1-Instruct: <|end_of_text|>, <|eom_id|>,
    <|eot_id|>; Qwen3: <|im_end|>, <|endoftext|>). Sorted, without duplicates."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for x in (getattr(tok, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        for i in (x if isinstance(x, (list, tuple)) else [x]):
            if isinstance(i, int) and not isinstance(i, bool):
                ids.add(i)
    return tuple(sorted(ids))

