#!/usr/bin/env python3
"""Peer yardstick: Hugging Face transformers on CPU, float32, on the same checkpoint and shapes
as `moe bench` (random prompt ids, greedy, KV cache on): the prompts prefilled in one
forward, then each decode step timed alone (before 2026-12-07 the decode time was the
difference of two `generate` calls, which the prefill's run-to-run spread could swamp). Not a project dependency: run it in a
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


def step(ids, past=None):
    """One forward with the KV cache; the next tokens (greedy) and the cache."""
    out = model(input_ids=ids, past_key_values=past, use_cache=True)
    return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values


results = []
with torch.inference_mode():
    # One short prefill and decode step before anything is timed (one-time costs), as
    # `moe bench` warms up.
    warm = torch.randint(3, model.config.vocab_size, (1, 4), generator=gen)
    step(step(warm)[0])
    for batch in [int(b) for b in args.batch.split(",")]:
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=gen)
        # As `moe bench` measures: the prompts prefilled in one step (time to first token),
        # then decoded together, each step timed on its own.
        t = time.perf_counter()
        nxt, past = step(ids)
        prefill = time.perf_counter() - t
        steps = []
        for _ in range(args.gen):
            t = time.perf_counter()
            nxt, past = step(nxt, past)
            steps.append(time.perf_counter() - t)
        decode = sum(steps)
        steps.sort()
        results.append({"batch": batch, "prefill_tok_s": batch * args.prompt_len / prefill,
                        "decode_tok_s": batch * args.gen / decode,
                        "itl_p50_ms": 1e3 * steps[len(steps) // 2]})
        print(f"batch {batch}: prefill {results[-1]['prefill_tok_s']:.1f} tok/s, decode "
              f"{results[-1]['decode_tok_s']:.1f} tok/s, ITL p50 {results[-1]['itl_p50_ms']:.1f} ms",
              flush=True)
print(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}))
