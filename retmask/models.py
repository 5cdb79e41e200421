"""Loading a model and its tokenizer by name: "toy" (the shipped toy model), a local folder, or a
Hugging Face hub name (downloaded only when the user names it)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(name: str, *, dtype: str | None = None, device: str | None = None):
    """(model, tokenizer), the model in eval mode. dtype: "bf16", "fp16", "fp32" or None (bf16 on CUDA,
    fp32 on CPU)."""

    from . import toy

    device = device or default_device()
    torch_dtype = run_dtype(dtype, device)
    if name == toy.NAME or Path(name).resolve() == toy.ASSET_DIR.resolve():
        return toy.load(dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM

    tok = tokenizer(name)
    model = _hub(name, "weights", AutoModelForCausalLM.from_pretrained, dtype=torch_dtype, attn_implementation="eager")
    return model.to(device).eval(), tok


def run_dtype(dtype: str | None, device: str):
    """The torch dtype a run loads its weights in: `dtype` ("bf16", "fp16", "fp32"), or None for bf16 on CUDA
    and fp32 elsewhere (what `load` and the plans that size a run both use)."""
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}
    if dtype not in dt:
        raise ValueError(f"dtype={dtype!r}: use bf16, fp16 or fp32")
    return dt[dtype] or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)


def check_device(device: str | None) -> None:
    """A clear error for a --device torch cannot use, before anything is loaded."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: {torch.cuda.device_count()} GPU(s) visible (cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1})")


def tokenizer(name: str):
    """The model's tokenizer alone (no weights), with `config`'s checks first."""
    from transformers import AutoTokenizer

    from . import toy

    config(name)
    if name == toy.NAME or Path(name).resolve() == toy.ASSET_DIR.resolve():
        return AutoTokenizer.from_pretrained(toy.ASSET_DIR)
    check_tokenizer(name)
    try:
        return _hub(name, "tokenizer", AutoTokenizer.from_pretrained)
    except ValueError as e:
        if str(e).startswith(f"model {name!r}"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {name!r}: could not load its tokenizer ({first[:300]}); save the tokenizer with "
                         "the model (tokenizer.save_pretrained(folder))") from None


# files that hold a tokenizer's vocabulary (a folder with none of them cannot give a tokenizer)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                "sentencepiece.bpe.model")


def check_tokenizer(name: str) -> None:
    """A clear error for a local model folder without a tokenizer, before any work (hub names are
    checked when the tokenizer loads)."""
    p = Path(name)
    if p.is_dir() and not any((p / f).is_file() for f in _VOCAB_FILES) and not any(p.glob("*.tiktoken")):
        raise ValueError(f"model {name!r}: the folder has no tokenizer (none of {', '.join(_VOCAB_FILES[:3])}, ...); "
                         "save it there too: tokenizer.save_pretrained(folder)")


def context_len(config) -> int | None:
    """The positions a model was built for (`max_position_embeddings` of its config, or of its text config)."""
    config = getattr(config, "text_config", config)
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


@lru_cache(maxsize=32)  # read once per process: the commands check a model's heads and policies against it
def config(name: str, *, arch: bool = True):
    """The model's config (the text config of a multimodal one; shared, do not change it), with a clear
    error for a folder that holds no model, a hub name that cannot be reached, or (with `arch`) an
    architecture the engine does not run; no weights are read. Call it before expensive work."""
    from . import hf, toy

    if name == toy.NAME:
        from transformers import LlamaConfig

        return LlamaConfig(**toy.CONFIG)
    from transformers import AutoConfig

    p = Path(name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(f"model {name!r}: {'the folder has no config.json' if p.is_dir() else 'not a folder'}; "
                             "give a folder saved with save_pretrained (config.json, weights, tokenizer)")
    elif "/" not in name or name.startswith((".", "/")):
        raise ValueError(f"model {name!r}: no such folder; give 'toy', a local folder or a hub name like "
                         "meta-llama/Llama-3.1-8B-Instruct")
    c = _hub(name, "config", AutoConfig.from_pretrained)
    c = getattr(c, "text_config", c)
    if arch and getattr(c, "model_type", None) not in hf.SUPPORTED:
        raise ValueError(f"model {name!r}: model_type {getattr(c, 'model_type', None)!r} is not supported; retmask "
                         f"runs {', '.join(hf.SUPPORTED)} models")
    return c


def check_trainable(name: str) -> None:
    """What DPO training needs of a model besides its weights, checked before any work: a causal LM whose
    config.json names its class (`architectures`, which TRL reads), and a tokenizer."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    c = config(name, arch=False)
    if getattr(c, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model {name!r}: model_type {getattr(c, 'model_type', None)!r} is not a causal language "
                         "model transformers knows; DPO trains one")
    if not getattr(c, "architectures", None):
        raise ValueError(f"model {name!r}: its config.json names no architectures, so the trainer cannot tell which "
                         f"class to load; save the model with save_pretrained (it records them) or add "
                         f"\"architectures\": [\"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[c.model_type]}\"]")
    check_tokenizer(name)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) accepts a connection, asked once per process. False under
    HF_HUB_OFFLINE=1; True behind a proxy (the proxy decides). Offline, the libraries would otherwise retry
    each file for half a minute before failing."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub(name: str, what: str, load, **kw):
    """`load(name, **kw)`, with an error that names the model when its files cannot be had (offline, a
    wrong name, a gated model without a login). When the hub cannot be reached, only the local cache is
    read (at once, instead of retrying)."""
    offline = not hub_reachable()
    try:
        return load(name, **kw, **({"local_files_only": True} if offline else {}))
    except OSError as e:
        if offline:
            raise ValueError(f"model {name!r}: the hub cannot be reached from here (no network, or HF_HUB_OFFLINE=1) "
                             f"and its {what} is not in the local cache; give a local folder (save_pretrained) or "
                             "run where the hub is reachable") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {name!r}: could not load its {what} ({first[:300]}); give a local folder, or "
                         "check the name, the network and `hf auth login`") from None


def load_path(name: str) -> str:
    """What to give a library that loads the model itself (TRL's DPOTrainer, the LoRA merge): a local folder
    as it is; a hub name as it is where the hub answers, else its snapshot folder in the local cache, so that
    nothing retries the network for half a minute per file."""
    if Path(name).exists() or hub_reachable():
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached, or not a valid repo id: one message either way)
        raise ValueError(f"model {name!r}: the hub cannot be reached from here (no network, or HF_HUB_OFFLINE=1) "
                         "and the model is not in the local cache; give a local folder (save_pretrained) or run "
                         "where the hub is reachable") from None


def display_name(name: str) -> str:
    return Path(name).name if Path(name).exists() else name.replace("/", "--")


def check_heads(name: str, heads) -> None:
    """Validate a HeadSet against the model's config alone (before any weights are loaded)."""
    if heads is None:
        return
    c = config(name)
    heads.validate(c.num_hidden_layers, c.num_attention_heads)


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

