"""The official `openai` client against a router's HTTPS port, trusting only the given CA.
Prints one JSON object: the models, a greedy completion's text and usage, and whether a
client that does not trust the CA was refused.

usage: openai_tls.py HOST:PORT MODEL CA_PEM PROMPT MAX_TOKENS
"""
import json
import ssl
import sys

import openai

try:  # the HTTP library the installed openai client is built on
    import httpx2 as httpx
except ImportError:
    import httpx
from openai import OpenAI


def main():
    addr, model, ca, prompt, n = sys.argv[1:6]
    verified = httpx.Client(verify=ssl.create_default_context(cafile=ca))
    client = OpenAI(
        base_url=f"https://{addr}/v1", api_key="unused", max_retries=0, http_client=verified
    )
    out = {"models": [m.id for m in client.models.list().data]}
    done = client.completions.create(
        model=model, prompt=prompt, max_tokens=int(n), temperature=0,
        extra_body={"ignore_eos": True},
    )
    out["text"] = done.choices[0].text
    out["usage"] = [done.usage.prompt_tokens, done.usage.completion_tokens]
    # The default trust store does not know the test CA: the handshake must fail.
    untrusting = OpenAI(base_url=f"https://{addr}/v1", api_key="unused", max_retries=0)
    try:
        untrusting.models.list()
        out["untrusted_refused"] = False
    except openai.APIConnectionError:
        out["untrusted_refused"] = True
    print(json.dumps(out))


if __name__ == "__main__":
    main()
