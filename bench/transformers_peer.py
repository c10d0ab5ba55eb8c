#!/usr/bin/env python3
"""Peer yardstick: Hugging Face transformers on CPU, float32, on the same checkpoint and shapes
as `moe bench` (random prompt ids, greedy, KV cache on). Not a project dependency: run it in a
virtualenv with torch and transformers.

Usage: python bench/transformers_peer.py CHECKPOINT_DIR [--batch 1,32] [--prompt-len 128] [--gen 32]
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--batch", default="1,32")
parser.add_argument("--prompt-len", type=int, default=128)
parser.add_argument("--gen", type=int, default=32)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)

model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
model.eval()
gen = torch.Generator().manual_seed(0)
results = []
for batch in [int(b) for b in args.batch.split(",")]:
    ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=gen)
    mask = torch.ones_like(ids)
    common = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.gen + 1, min_new_tokens=args.gen + 1, **common)
        total = time.perf_counter() - t
    decode = max(total - prefill, 1e-9)
    results.append({"batch": batch, "prefill_tok_s": batch * args.prompt_len / prefill,
                    "decode_tok_s": batch * args.gen / decode})
    print(f"batch {batch}: prefill {results[-1]['prefill_tok_s']:.1f} tok/s, decode {results[-1]['decode_tok_s']:.1f} tok/s", flush=True)
print(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}))
