#!/usr/bin/env python3
"""Kimi-K2's tokenizer at its real size, against tiktoken: writes a synthetic vocabulary of
163,584 ranks (Kimi's count; tokens of up to 16 bytes made by concatenating earlier ones)
with the Kimi fixture's special tokens moved after it, and ~0.5 MB of text (docs/*.md, a
soup of many scripts, whitespace and contraction runs); then, after the Rust side has
encoded the text (`cargo test --release -p moe-model --lib -- --ignored tiktoken_at_scale`,
which `bench/tiktoken_at_scale.sh` runs), compares its ids with what Kimi's class gives
(tiktoken) and prints both sides' times.

Usage: python3 bench/tiktoken_at_scale.py make DIR | compare DIR
Needs tiktoken (pip install tiktoken).
"""
import base64
import glob
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
import make_kimi_k2_tiny as kimi  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

BASE = 163_584


def make(out):
    os.makedirs(out, exist_ok=True)
    rng = random.Random(1)
    toks = [bytes([b]) for b in range(256)]
    seen = set(toks)
    while len(toks) < BASE:
        pool = toks[-20000:] if len(toks) > 20000 and rng.random() < 0.5 else toks
        t = rng.choice(pool) + rng.choice(toks[:5000])
        if len(t) <= 16 and t not in seen:
            seen.add(t)
            toks.append(t)
    with open(os.path.join(out, "tiktoken.model"), "w") as f:
        for rank, t in enumerate(toks):
            f.write(f"{base64.b64encode(t).decode()} {rank}\n")
    fixture = os.path.join(HERE, "..", "tests", "fixtures", "kimi-k2-tiny")
    cfg = json.load(open(os.path.join(fixture, "tokenizer_config.json")))
    old = min(int(k) for k in cfg["added_tokens_decoder"])
    cfg["added_tokens_decoder"] = {
        str(int(k) - old + BASE): v for k, v in cfg["added_tokens_decoder"].items()
    }
    json.dump(cfg, open(os.path.join(out, "tokenizer_config.json"), "w"))
    docs = [open(p).read() for p in sorted(glob.glob(os.path.join(HERE, "..", "docs", "*.md")))]
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
              (0x2000, 0x206F), (0x1F300, 0x1F5FF), (0x300, 0x36F)]
    soup = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(60_000))
    runs = "".join(rng.choice([" ", "\n", "\t", "\r\n", "  ", "\u3000", "\xa0", "a", "B", "'s",
                               "'LL", "1", "12345", "<|im_end|>"]) for _ in range(20_000))
    with open(os.path.join(out, "text.txt"), "w", newline="") as f:
        f.write("\n".join(docs) + soup + runs)


def compare(out):
    tok = kimi.KimiTokenizer(load_tiktoken_bpe(os.path.join(out, "tiktoken.model")))
    text = open(os.path.join(out, "text.txt"), newline="").read()
    start = time.perf_counter()
    want = tok.encode(text)
    took = time.perf_counter() - start
    ours = json.load(open(os.path.join(out, "ids.json")))
    same = want == ours
    print(f"tiktoken: {len(text.encode())} bytes -> {len(want)} ids in {took * 1e3:.0f} ms; "
          f"ours: {len(ours)} ids; identical: {same}")
    if not same:
        at = next((i for i, (a, b) in enumerate(zip(want, ours)) if a != b), min(len(want), len(ours)))
        sys.exit(f"first difference at id {at}")


if __name__ == "__main__":
    {"make": make, "compare": compare}[sys.argv[1]](sys.argv[2])
