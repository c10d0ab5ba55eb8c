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

import grpc

from grpc_client import load_stubs  # the same stubs, compiled from the repository's protos
from stream_pool import run_concurrently


def main(addr, spec):
    pb, pb_grpc = load_stubs()
    ready_after = spec.get("ready_after", 1)
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.InferenceStub(channel)

        def run(i, s, note):
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
                    note(len(msg.token_ids))
                    if msg.finish_reason:
                        finish = msg.finish_reason
                        usage = [msg.usage.prompt_tokens, msg.usage.completion_tokens]
                return {"ids": ids, "logprobs": logprobs, "text": "".join(pieces),
                        "finish_reason": finish, "usage": usage}
            except grpc.RpcError as e:
                note(ready_after)
                return {"error": f"{e.code()}: {e.details()}", "ids": ids}

        results = run_concurrently(spec["streams"], ready_after, run)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], json.loads(sys.argv[2]))
