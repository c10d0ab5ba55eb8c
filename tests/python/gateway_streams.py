#!/usr/bin/env python3
"""Many concurrent Generate streams through a gateway with Python grpcio, for the failover test.

Usage: gateway_streams.py ADDR JSON
  JSON = {"streams": [{"input_ids": [...], "max_new_tokens": N, "temperature": T?, "top_p": P?,
          "seed": S?}, ...], "ready_after": K}
Prints `READY` (flushed) once every stream has received at least K tokens (the test kills a
router then), and at the end one JSON line: per stream its ids, logprobs, text, finish reason
and usage, or the error it ended with.
"""
import json
import sys
import threading

import grpc

from grpc_client import load_stubs  # the same stubs, compiled from the repository's protos


def main(addr, spec):
    pb, pb_grpc = load_stubs()
    streams = spec["streams"]
    ready_after = spec.get("ready_after", 1)
    results = [None] * len(streams)
    counts = [0] * len(streams)
    lock = threading.Lock()
    ready = threading.Event()

    def note(i, n):
        with lock:
            counts[i] += n
            if not ready.is_set() and all(c >= ready_after for c in counts):
                ready.set()
                print("READY", flush=True)

    def run(i, s, stub):
        request = pb.GenerateRequest(max_new_tokens=s["max_new_tokens"], ignore_eos=True,
                                     logprobs=True)
        request.input_ids.extend(s["input_ids"])
        for key in ("temperature", "top_p", "seed"):
            if key in s:
                setattr(request, key, s[key])
        ids, logprobs, pieces, finish, usage = [], [], [], None, None
        try:
            for msg in stub.Generate(request, timeout=300):
                ids.extend(msg.token_ids)
                logprobs.extend(msg.logprobs)
                pieces.append(msg.text)
                note(i, len(msg.token_ids))
                if msg.finish_reason:
                    finish = msg.finish_reason
                    usage = [msg.usage.prompt_tokens, msg.usage.completion_tokens]
            results[i] = {"ids": ids, "logprobs": logprobs, "text": "".join(pieces),
                          "finish_reason": finish, "usage": usage}
        except grpc.RpcError as e:
            results[i] = {"error": f"{e.code()}: {e.details()}", "ids": ids}
            note(i, ready_after)

    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        threads = [threading.Thread(target=run, args=(i, s, stub)) for i, s in enumerate(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], json.loads(sys.argv[2]))
