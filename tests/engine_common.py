"""What the engine tests share: the heads switched off, tiny models of a family with their references,
prompts, and the reference generations (transformers' greedy `generate`, scope `generated` by its
definition)."""

import copy

import torch
from transformers import DynamicCache

from retmask import hf
from retmask.heads import HeadSet
from tiny_models import tiny

HEADS = HeadSet.from_list("1-2,2-0,2-3")  # lowest layer 1: layer 0 of the prompt is shared under scope all
NEW = 9


def family_models(name):
    """(name, model the engine attaches to, untouched reference, reference with HEADS' o_proj columns zeroed)."""
    m = tiny(name)
    ref = copy.deepcopy(m)
    return name, m, ref, hf.zeroed_copy(ref, HEADS)


def prompts(seed=1, lens=(20, 5, 13, 1, 30, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lens]


def hf_greedy(model, p, n=NEW):
    return model.generate(torch.tensor([p], device=model.device), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()



def generated_scope_greedy(ref, zeroed, p, n=NEW):
    """Greedy tokens of scope `generated` by its definition: the intact model over the prompt, then the
    zeroed copy over the generated positions, in one cache."""
    cache = DynamicCache(config=ref.config)
    with torch.no_grad():
        out = ref(torch.tensor([p]), past_key_values=cache, use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        for _ in range(n - 1):
            out = zeroed(torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    return toks
