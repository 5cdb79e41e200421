"""Two policies of the shipped toy model in one batched pass: the original, and the model with its
retrieval heads switched off. Prints one line per row: the policy and its greedy answer."""

import json

from retmask import toy
from retmask.engine import ORIGINAL, Engine, GenConfig, Group, Policy
from retmask.heads import HeadSet

model, tok = toy.load()  # a 4-layer Llama with 4 query heads per layer, on the CPU
first = json.loads((toy.ASSET_DIR.parent / "instructions.jsonl").open().readline())  # a needle-in-a-haystack question
prompt = tok.apply_chat_template(first["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
heads = HeadSet.from_list("0-1,0-2,0-3,1-2,1-3,2-0,2-1")  # what `make demo` detects at score >= 0.5
cfg = GenConfig(max_new_tokens=16, eos_ids=(tok.eos_token_id,))  # greedy (the default Sampling)

with Engine(model, tok, slots=2, max_len=len(prompt) + 16) as eng:
    for res in eng.generate([Group(prompt, [ORIGINAL, Policy(heads)])], cfg):
        for row in res.rows:
            print(f"{row.policy:>10} | {tok.decode(row.tokens, skip_special_tokens=True)}")
