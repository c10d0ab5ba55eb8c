"""Drives the router's OpenAI-compatible HTTP API with the official `openai` client and prints
one JSON object with what came back (the Rust test compares it with the offline engine).

usage: openai_client.py HOST:PORT MODEL SPEC_JSON
SPEC_JSON: {"prompt": str, "messages": [...], "max_tokens": int}
"""
import json
import sys

import openai
from openai import OpenAI


def main():
    addr, model, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
    out = {"models": [m.id for m in client.models.list().data]}
    n = spec["max_tokens"]
    extra = {"ignore_eos": True}

    done = client.completions.create(
        model=model, prompt=spec["prompt"], max_tokens=n, temperature=0, extra_body=extra
    )
    out["completion"] = {
        "text": done.choices[0].text,
        "finish_reason": done.choices[0].finish_reason,
        "usage": [done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens],
    }

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=spec["messages"],
        max_tokens=n,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {"text": "".join(pieces), "finish_reason": finish, "usage": usage}

    lp = client.chat.completions.create(
        model=model,
        messages=spec["messages"],
        max_tokens=n,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=extra,
    )
    out["chat_logprobs"] = {
        "text": lp.choices[0].message.content,
        "logprobs": [t.logprob for t in lp.choices[0].logprobs.content],
        "top": [[x.logprob for x in t.top_logprobs] for t in lp.choices[0].logprobs.content],
    }

    legacy = client.completions.create(
        model=model, prompt=spec["prompt"], max_tokens=n, temperature=0, logprobs=2, extra_body=extra
    )
    out["completion_logprobs"] = legacy.choices[0].logprobs.token_logprobs

    errors = {}
    try:
        client.completions.create(model=model, prompt=spec["prompt"], max_tokens=4, n=2)
    except openai.BadRequestError as e:
        errors["n"] = [e.status_code, e.body.get("type") if isinstance(e.body, dict) else None]
    try:
        client.completions.create(model="no-such-model", prompt=spec["prompt"], max_tokens=4)
    except openai.NotFoundError as e:
        errors["model"] = [e.status_code, e.body.get("type") if isinstance(e.body, dict) else None]
    try:
        client.completions.create(model=model, prompt=spec["prompt"], max_tokens=4, temperature=-1)
    except openai.BadRequestError as e:
        errors["temperature"] = [e.status_code, e.message]
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()
