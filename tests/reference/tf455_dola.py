"""Run transformers 4.55's built-in DoLa (``generate(dola_layers=...)``) and print the tokens.

Executed by tests/test_generation_tf455.py in a separate virtualenv that has transformers==4.55.x
(the last release with DoLa built in). Reads a JSON job from stdin, writes JSON to stdout:
{"model": {"gguf": path} | {"config": {...}, "seed": int}, "cases": [{"input_ids": [[...]],
"dola_layers": ..., "max_new_tokens": n, "repetition_penalty": r}]}
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
job = json.load(sys.stdin)
spec = job["model"]
if "gguf" in spec:
    folder, name = os.path.split(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
else:
    config = AutoConfig.for_model(**spec["config"])
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config)
    # Same weights as the test's model: the test ships its state dict.
    state = torch.load(spec["state_dict"], weights_only=True)
    model.load_state_dict(state)
model.eval()
results = []
for case in job["cases"]:
    ids = torch.tensor(case["input_ids"])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        dola_layers=case["dola_layers"],
        repetition_penalty=case["repetition_penalty"],
        max_new_tokens=case["max_new_tokens"],
        min_new_tokens=case["max_new_tokens"],
        do_sample=False,
        pad_token_id=model.config.eos_token_id
        if model.config.pad_token_id is None
        else model.config.pad_token_id,
    )
    results.append(out[0, ids.shape[1] :].tolist())
json.dump({"transformers": transformers.__version__, "tokens": results}, sys.stdout)
