#!/usr/bin/env python3
"""Peer yardstick: llama.cpp (through llama-cpp-python) on a GGUF of the same checkpoint, with
the shapes of `moe bench` (random prompt ids, greedy, KV cache on). A batch of N is N
sequences in one llama_batch: prefill is every prompt in one decode call, then each step one
token per sequence in one call. Not a project dependency: run it in a virtualenv with
llama-cpp-python, after converting the checkpoint with llama.cpp's convert_hf_to_gguf.py
(`--outtype q8_0` for Q8_0: int8 weights in blocks of 32 with an f16 scale, and int8
activations in its dot products, so other numerics than ours).

Usage: python bench/llama_cpp_peer.py MODEL.gguf [--batch 1,32] [--prompt-len 128] [--gen 32]
"""
import argparse
import ctypes
import json
import random
import time

import llama_cpp as llama
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--batch", default="1,32")
parser.add_argument("--prompt-len", type=int, default=128)
parser.add_argument("--gen", type=int, default=32)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
batches = [int(b) for b in args.batch.split(",")]

llama.llama_backend_init()
mparams = llama.llama_model_default_params()
model = llama.llama_model_load_from_file(args.model.encode(), mparams)
vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
cparams = llama.llama_context_default_params()
largest = max(batches)
cparams.n_ctx = largest * (args.prompt_len + args.gen + 1)
cparams.n_batch = largest * args.prompt_len
cparams.n_ubatch = min(512, cparams.n_batch)
cparams.n_seq_max = largest
cparams.n_threads = args.threads
cparams.n_threads_batch = args.threads
ctx = llama.llama_init_from_model(model, cparams)
rng = random.Random(0)


def run_batch(batch, tokens):
    """One llama_decode over `tokens` [(seq, pos, id, wants_logits)]; the argmax of each
    sequence's logits where asked."""
    b = llama.llama_batch_init(len(tokens), 0, 1)
    for i, (seq, pos, tok, logits) in enumerate(tokens):
        b.token[i] = tok
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
    b.n_tokens = len(tokens)
    if llama.llama_decode(ctx, b) != 0:
        raise SystemExit("llama_decode failed")
    chosen = {}
    for i, (seq, _, _, logits) in enumerate(tokens):
        if logits:
            row = llama.llama_get_logits_ith(ctx, i)
            values = np.ctypeslib.as_array(row, shape=(vocab_size,))
            chosen[seq] = int(values.argmax())
    llama.llama_batch_free(b)
    return chosen


results = []
for batch in batches:
    llama.llama_memory_clear(llama.llama_get_memory(ctx), True)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(args.prompt_len)] for _ in range(batch)]
    t = time.perf_counter()
    last = run_batch(
        batch,
        [(s, p, tok, p == args.prompt_len - 1) for s in range(batch) for p, tok in enumerate(prompts[s])],
    )
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for step in range(args.gen):
        pos = args.prompt_len + step
        last = run_batch(batch, [(s, pos, last[s], True) for s in range(batch)])
    decode = time.perf_counter() - t
    results.append({"batch": batch, "prefill_tok_s": batch * args.prompt_len / prefill,
                    "decode_tok_s": batch * args.gen / decode})
    print(f"batch {batch}: prefill {results[-1]['prefill_tok_s']:.1f} tok/s, "
          f"decode {results[-1]['decode_tok_s']:.1f} tok/s", flush=True)
print(json.dumps({"llama_cpp_python": llama.__version__, "threads": args.threads, "results": results}))
