"""The toy model: a small Llama (transformers' own class, GQA, RoPE) with a word-level tokenizer and a
chat template, trained by `scripts/train_toy.py` on synthetic needle-in-a-haystack prompts so that
some of its heads are real retrieval heads. Its files ship in `retmask/assets/toy/`; `load()` gives
the model and tokenizer, and `"toy"` is accepted wherever a model name is.
"""

from __future__ import annotations

from pathlib import Path

from . import synth

ASSET_DIR = Path(__file__).parent / "assets" / "toy"
NAME = "toy"
TRAIN_LEN = 512  # longest context the toy model was trained on (tokens)
# `retmask pairs` on the toy: new tokens per answer (its answers take about 5; a row whose retrieval heads are
# off may never say EOS, and would decode to the paper's 2048 on a CPU)
PAIRS_MAX_NEW_TOKENS = 64
SPECIALS = ["<unk>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
ADDED = ["<book>", "</book>"]
TEMPLATE_WORDS = ["based", "on", "the", "content", "of", "book", "question", "answer"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The architecture: 4 layers x 4 query heads (2 KV heads, head dim 32), hidden 128, RoPE theta 5e5.
CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=32768, rms_norm_eps=1e-5,
              tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def build_tokenizer():
    """The word-level tokenizer: every word of the synthetic text and the NIAH prompt is one token;
    anything else is <unk>. Lower-cases; splits on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS[:2])
    for w in TEMPLATE_WORDS + synth.vocabulary():
        if w not in words:
            words.append(w)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIALS[2:])
    tok.add_tokens(ADDED)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|end|>", chat_template=CHAT_TEMPLATE, model_max_length=32768)


def build_config(tok, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None, **{**CONFIG, **overrides})


def available(path: str | Path = ASSET_DIR) -> bool:
    return (Path(path) / "model.safetensors").is_file()


def load(path: str | Path = ASSET_DIR, *, dtype=None, device: str = "cpu"):
    """(model, tokenizer) of the shipped toy model, in eval mode, with eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not available(p):
        raise ValueError(f"no toy model at {p}: run `python scripts/train_toy.py --out {p}`")
    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype or torch.float32, attn_implementation="eager")
    return model.to(device).eval(), tok


def answer_text(needle: synth.Needle) -> str:
    """What the toy model is trained to answer: the four code words and a period."""
    return f"{needle.real_needle} ."

