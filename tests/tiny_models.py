"""Tiny random models of each supported family, built locally from configs (nothing downloaded)."""

from __future__ import annotations

import torch


def tiny(family: str, seed: int = 0, vocab: int = 97, layers: int = 4, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig, Olmo3Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(**common)
    elif family == "qwen3":
        cfg = Qwen3Config(**common)
    elif family == "olmo3":  # sliding-window layers on 3 of every 4, as OLMo-3; a small window so tests cross it
        cfg = Olmo3Config(**common, sliding_window=8,
                          layer_types=["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(layers)])
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()
    with torch.no_grad():  # larger weights than the init: sharper attention, so head switches matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


FAMILIES = ("llama", "qwen3", "olmo3")
