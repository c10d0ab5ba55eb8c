#!/usr/bin/env python3
"""Speculative decoding's effect on a running router (`--speculative-config`): output tokens/s
at a concurrency, and the router's draft acceptance over the run (its /metrics).

Two workloads. `free`: random prompt ids, greedy answers; on a random-weight checkpoint the
answer seldom repeats itself, so this is what drafts cost when they miss. `loop`: a prompt of
a repeating 7-token pattern answered with `repetition_penalty` 0.2 (which favours tokens
already seen), so answers fall into loops that drafts catch: what they save when they agree.
Each request is greedy, so every run gives the same tokens with drafts or without (the router
guarantees that bit for bit; this script only times it).

Usage: python bench/speculative.py --http HOST:PORT [--workload free|loop] [--concurrency 1]
       [--requests 8] [--max-tokens 128] [--prompt-len 64]
Prints one JSON object: {"workload", "concurrency", "output_tok_s", "drafted", "accepted",
"acceptance", "steps"}.
"""
import argparse
import json
import random
import threading
import time
import urllib.request

parser = argparse.ArgumentParser()
parser.add_argument("--http", required=True)
parser.add_argument("--workload", choices=["free", "loop"], default="free")
parser.add_argument("--concurrency", type=int, default=1)
parser.add_argument("--requests", type=int, default=8)
parser.add_argument("--max-tokens", type=int, default=128)
parser.add_argument("--prompt-len", type=int, default=64)
args = parser.parse_args()


def metrics():
    page = urllib.request.urlopen(f"http://{args.http}/metrics").read().decode()
    values = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def body(i):
    rng = random.Random(i)
    if args.workload == "free":
        prompt = [rng.randrange(3, 500) for _ in range(args.prompt_len)]
        extra = {}
    else:
        start = rng.randrange(3, 400)
        prompt = [start + (k % 7) * 13 for k in range(args.prompt_len)]
        extra = {"repetition_penalty": 0.2}
    return {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def send(i, out):
    request = urllib.request.Request(
        f"http://{args.http}/v1/completions",
        data=json.dumps(body(i)).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.loads(urllib.request.urlopen(request).read())
    out.append(answer["usage"]["completion_tokens"])


before = metrics()
done = []
queue = list(range(args.requests))
lock = threading.Lock()


def worker():
    while True:
        with lock:
            if not queue:
                return
            i = queue.pop(0)
        send(i, done)


start = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - start
after = metrics()


def delta(name):
    return after.get(name, 0.0) - before.get(name, 0.0)


drafted = delta("moe_spec_decode_draft_tokens_total")
accepted = delta("moe_spec_decode_accepted_tokens_total")
print(
    json.dumps(
        {
            "workload": args.workload,
            "concurrency": args.concurrency,
            "output_tok_s": round(sum(done) / elapsed, 1),
            "drafted": int(drafted),
            "accepted": int(accepted),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "steps": int(delta("moe_step_tokens_count")),
        }
    )
)
