#!/usr/bin/env python3
"""Many concurrent streamed completions through a gateway's OpenAI API with the official
`openai` client, for the failover test.

Usage: gateway_openai.py HOST:PORT JSON
  JSON = {"model": str, "streams": [{"input_ids": [...], "max_new_tokens": N,
          "temperature": T, "top_p": P?, "seed": S?}, ...], "ready_after": K}
Prints `READY` (flushed) once every stream has received at least K tokens (the test kills a
router then), and at the end one JSON line: per stream its text, tokens, logprobs, finish
reason and usage, or the error it ended with.
"""
import json
import sys

from openai import OpenAI

from stream_pool import run_concurrently


def main(addr, spec):
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0, timeout=300)
    ready_after = spec.get("ready_after", 1)

    def run(i, s, note):
        extra = {"ignore_eos": True}
        if "top_p" in s:
            extra["top_p"] = s["top_p"]
        pieces, tokens, logprobs, finish, usage = [], [], [], None, None
        try:
            stream = client.completions.create(
                model=spec["model"], prompt=s["input_ids"], max_tokens=s["max_new_tokens"],
                temperature=s["temperature"], seed=s.get("seed"), logprobs=1, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
            for chunk in stream:
                if chunk.usage is not None:
                    usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
                for choice in chunk.choices:
                    pieces.append(choice.text)
                    if choice.logprobs is not None:
                        tokens.extend(choice.logprobs.tokens or [])
                        logprobs.extend(choice.logprobs.token_logprobs or [])
                        note(len(choice.logprobs.tokens or []))
                    if choice.finish_reason:
                        finish = choice.finish_reason
            return {"text": "".join(pieces), "tokens": tokens, "logprobs": logprobs,
                    "finish_reason": finish, "usage": usage}
        except Exception as e:  # noqa: BLE001 - the test reports whatever ended a stream
            note(ready_after)
            return {"error": f"{type(e).__name__}: {e}", "tokens": tokens}

    print(json.dumps(run_concurrently(spec["streams"], ready_after, run)), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], json.loads(sys.argv[2]))
