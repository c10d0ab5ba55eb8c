"""Drives the router's OpenAI-compatible HTTP API with the official `openai` client and prints
one JSON object with what came back (the Rust test compares it with the offline engine).

usage: openai_client.py HOST:PORT MODEL SPEC_JSON
SPEC_JSON: {"prompt": str, "messages": [...], "max_tokens": int}
"""
import json
import sys
import urllib.error
import urllib.request

import openai
from openai import OpenAI


def main():
    addr, model, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
    out = {"models": [m.id for m in client.models.list().data]}
    out["retrieved"] = client.models.retrieve(model).id
    try:
        client.models.retrieve("no-such-model")
        out["retrieve_missing"] = "found"
    except openai.NotFoundError as e:
        out["retrieve_missing"] = e.status_code
    # vLLM's tokenizer endpoints, which the client does not wrap: plain requests.
    def call(path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{addr}{path}", data=data, headers={
            "Authorization": "Bearer unused", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return [r.status, json.load(r)]
        except urllib.error.HTTPError as e:
            return [e.code, json.load(e)]

    def post(path, body):
        return call(path, body)

    out["tokenize"] = {
        "prompt": post("/tokenize", {"model": model, "prompt": spec["prompt"]}),
        "chat": post("/tokenize", {"model": model, "messages": spec["messages"],
                                   "return_token_strs": True}),
        "bad_model": post("/tokenize", {"model": "no-such-model", "prompt": "x"})[0],
    }
    chat_ids = out["tokenize"]["chat"][1]["tokens"]
    out["detokenize"] = post("/detokenize", {"model": model, "tokens": chat_ids})
    out["detokenize_bad"] = post("/detokenize", {"tokens": [10**9]})
    out["version"] = call("/version")[1]
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

    # SageMaker's `/invocations`: the API its body's fields name.
    chat_body = {"model": model, "messages": spec["messages"], "max_tokens": n, "temperature": 0, **extra}
    completion_body = {"model": model, "prompt": spec["prompt"], "max_tokens": n, "temperature": 0, **extra}
    invoked_chat = post("/invocations", chat_body)
    invoked_completion = post("/invocations", completion_body)
    invoked_response = post("/invocations", {"model": model, "input": "hi", "max_output_tokens": 2})
    out["invocations"] = {
        "chat": [invoked_chat[0], invoked_chat[1]["choices"][0]["message"]["content"]],
        "completion": [invoked_completion[0], invoked_completion[1]["choices"][0]["text"]],
        "response": [invoked_response[0], invoked_response[1].get("object")],
        "neither": post("/invocations", {"model": model})[0],
    }
    # vLLM's `priority`: refused by name under the default first-come-first-served policy.
    refused_priority = post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1,
                                                "priority": 2})
    out["priority"] = [refused_priority[0], refused_priority[1].get("error", {}).get("param")]

    # Logprobs with tools offered: streamed, every token's (those of text held while a call
    # might be starting go with the next chunk), the whole answer's.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    whole_t = client.chat.completions.create(
        model=model, messages=spec["messages"], max_tokens=n, temperature=0, logprobs=True,
        tools=tools, extra_body=extra)
    streamed_lp = []
    for chunk in client.chat.completions.create(
            model=model, messages=spec["messages"], max_tokens=n, temperature=0, logprobs=True,
            tools=tools, stream=True, extra_body=extra):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed_lp.extend(t.logprob for t in c.logprobs.content)
    out["tools_logprobs"] = {
        "whole": [t.logprob for t in whole_t.choices[0].logprobs.content],
        "streamed": streamed_lp,
        "tokens": whole_t.usage.completion_tokens,
    }

    # vLLM's continuous_usage_stats: every chunk carries the usage so far.
    running = []
    for chunk in client.chat.completions.create(
            model=model, messages=spec["messages"], max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body=extra):
        if chunk.choices and chunk.usage is not None:
            running.append([chunk.usage.prompt_tokens, chunk.usage.completion_tokens,
                            chunk.usage.total_tokens])
    out["continuous_usage"] = running

    # Without stream_options.include_usage, OpenAI sends no usage chunk.
    plain = client.completions.create(
        model=model, prompt=spec["prompt"], max_tokens=n, temperature=0, stream=True,
        extra_body=extra,
    )
    chunks = list(plain)
    out["plain_stream"] = {
        "text": "".join(c.choices[0].text for c in chunks if c.choices),
        "usage_chunks": sum(1 for c in chunks if c.usage is not None),
    }

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

    # vLLM's return_tokens_as_token_ids: tokens named by id, for clients that need them.
    as_ids = client.chat.completions.create(
        model=model, messages=spec["messages"], max_tokens=n, temperature=0, logprobs=True,
        top_logprobs=1, extra_body={**extra, "return_tokens_as_token_ids": True})
    out["chat_token_ids"] = [t.token for t in as_ids.choices[0].logprobs.content]
    legacy_ids = client.completions.create(
        model=model, prompt=spec["prompt"], max_tokens=n, temperature=0, logprobs=1,
        extra_body={**extra, "return_tokens_as_token_ids": True})
    out["completion_token_ids"] = legacy_ids.choices[0].logprobs.tokens

    legacy = client.completions.create(
        model=model, prompt=spec["prompt"], max_tokens=n, temperature=0, logprobs=2, extra_body=extra
    )
    out["completion_logprobs"] = legacy.choices[0].logprobs.token_logprobs

    errors = {}
    try:
        client.completions.create(model=model, prompt=spec["prompt"], max_tokens=4, n=17)
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
    # Parameters that would change the output and are not implemented: a 400 naming them.
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    refused = {
        "functions": dict(extra_body={"functions": [{"name": "f", "parameters": schema}]}),
        "prediction": dict(extra_body={"prediction": {"type": "content", "content": "x"}}),
        "tool_choice": dict(tool_choice="required"),
    }
    for param, kwargs in refused.items():
        try:
            client.chat.completions.create(model=model, messages=spec["messages"], max_tokens=4, **kwargs)
            errors[param] = "accepted"
        except openai.BadRequestError as e:
            errors[param] = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
    # Their no-op values and bookkeeping fields pass.
    ok = client.chat.completions.create(
        model=model, messages=spec["messages"], max_tokens=2, temperature=0,
        response_format={"type": "text"}, tools=[], tool_choice="none",
        user="u-1", metadata={"k": "v"}, store=False,
    )
    errors["no_op_values"] = ok.choices[0].finish_reason
    for param, kwargs in {
        "logit_bias": dict(logit_bias={"999999": 1}),
        "presence_penalty": dict(presence_penalty=3),
        "min_tokens": dict(extra_body={"min_tokens": 9}),
    }.items():
        try:
            client.completions.create(model=model, prompt=spec["prompt"], max_tokens=4, **kwargs)
            errors["bad_" + param] = "accepted"
        except openai.BadRequestError as e:
            errors["bad_" + param] = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
    out["errors"] = errors

    # Bias and penalties: the offline engine's tokens with the same adjustments (spec["adjust"]).
    a = spec["adjust"]
    adjusted = client.completions.create(
        model=model, prompt=spec["prompt_ids"], max_tokens=n, temperature=0, logprobs=0,
        logit_bias=a["logit_bias"], presence_penalty=a["presence_penalty"],
        frequency_penalty=a["frequency_penalty"],
        extra_body={"repetition_penalty": a["repetition_penalty"], "ignore_eos": True},
    )
    # Without logprobs nothing else reads the row: the router picks from the edited row.
    picked = client.completions.create(
        model=model, prompt=spec["prompt_ids"], max_tokens=n, temperature=0,
        logit_bias=a["logit_bias"], presence_penalty=a["presence_penalty"],
        frequency_penalty=a["frequency_penalty"],
        extra_body={"repetition_penalty": a["repetition_penalty"], "ignore_eos": True},
    )
    out["adjusted"] = {
        "text": adjusted.choices[0].text,
        "logprobs": adjusted.choices[0].logprobs.token_logprobs,
        "picked_text": picked.choices[0].text,
    }
    # n choices, seeded: reproducible, choice 0 is what n = 1 gives, streamed alike.
    def sampled(**kw):
        return client.completions.create(
            model=model, prompt=spec["prompt"], max_tokens=n, temperature=1.0, seed=7,
            extra_body={"ignore_eos": True}, **kw)
    three, again, one = sampled(n=3), sampled(n=3), sampled(n=1)
    pieces = {}
    streamed_usage = None
    for chunk in sampled(n=3, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            pieces[c.index] = pieces.get(c.index, "") + c.text
        if chunk.usage is not None:
            streamed_usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    chat_n = client.chat.completions.create(
        model=model, messages=spec["messages"], max_tokens=n, temperature=1.0, seed=7, n=2,
        extra_body={"ignore_eos": True})
    out["n"] = {
        "texts": [c.text for c in sorted(three.choices, key=lambda c: c.index)],
        "again": [c.text for c in sorted(again.choices, key=lambda c: c.index)],
        "one": one.choices[0].text,
        "usage": [three.usage.prompt_tokens, three.usage.completion_tokens],
        "streamed": [pieces.get(i) for i in range(3)],
        "streamed_usage": streamed_usage,
        "chat_indices": sorted(c.index for c in chat_n.choices),
    }

    # echo: the prompt scored (lm-evaluation-harness's loglikelihood request), alone and with
    # generated tokens after it.
    scored = client.completions.create(
        model=model, prompt=spec["prompt_ids"], max_tokens=0, echo=True, logprobs=1,
        temperature=0)
    lp = scored.choices[0].logprobs
    echoed = client.completions.create(
        model=model, prompt=spec["prompt"], max_tokens=4, echo=True, logprobs=0, temperature=0,
        extra_body={"ignore_eos": True})
    streamed_echo = "".join(
        c.choices[0].text for c in client.completions.create(
            model=model, prompt=spec["prompt"], max_tokens=4, echo=True, temperature=0,
            stream=True, extra_body={"ignore_eos": True}) if c.choices)
    out["echo"] = {
        "text": scored.choices[0].text,
        "tokens": lp.tokens,
        "token_logprobs": lp.token_logprobs,
        "top": [None if t is None else sorted(t.values(), reverse=True) for t in lp.top_logprobs],
        "usage": [scored.usage.prompt_tokens, scored.usage.completion_tokens],
        "with_tokens": echoed.choices[0].text,
        "with_tokens_logprobs": len(echoed.choices[0].logprobs.token_logprobs),
        "streamed": streamed_echo,
    }

    # min_tokens holds the end-of-sequence token back even when a bias makes it certain.
    held = client.completions.create(
        model=model, prompt=spec["prompt_ids"], max_tokens=n, temperature=0,
        logit_bias={str(spec["eos"]): 100}, extra_body={"min_tokens": 3},
    )
    out["min_tokens"] = [held.usage.completion_tokens, held.choices[0].finish_reason]

    # A batch of prompts (vLLM's list `prompt`, lm-evaluation-harness's batched requests):
    # prompt i's choices at indices i * n .., usage each prompt once; whole and streamed, as
    # text and as token ids, with echo.
    batch = [spec["prompt"], spec["other_prompt"]]
    whole = client.completions.create(
        model=model, prompt=batch, n=2, max_tokens=n, temperature=0, echo=True,
        extra_body={"ignore_eos": True})
    texts = {}
    for c in client.completions.create(
            model=model, prompt=[spec["prompt_ids"], spec["other_ids"]], max_tokens=n,
            temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}):
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        if c.usage is not None:
            streamed_batch_usage = [c.usage.prompt_tokens, c.usage.completion_tokens]
    too_many = None
    try:
        client.completions.create(model=model, prompt=["x"] * 65, max_tokens=1)
    except openai.BadRequestError as e:
        too_many = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
    out["batch"] = {
        "whole": [[c.index, c.text] for c in whole.choices],
        "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens],
        "streamed": [texts.get(i) for i in range(len(texts))],
        "streamed_usage": streamed_batch_usage,
        "too_many": too_many,
    }

    # vLLM's prompt_logprobs: every prompt token after the first scored with its rank and the
    # likeliest alternatives, on each completion choice and beside a chat's choices; echo's
    # logprobs keep their own count of alternatives; refused on a stream and past 20.
    def refused(**kw):
        try:
            client.completions.create(model=model, prompt=spec["prompt_ids"], max_tokens=1, **kw)
            return "accepted"
        except openai.BadRequestError as e:
            return [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]

    scored = client.completions.create(
        model=model, prompt=spec["prompt_ids"], max_tokens=2, temperature=0, echo=True,
        logprobs=1, extra_body={"prompt_logprobs": 3, "ignore_eos": True})
    chat_scored = client.chat.completions.create(
        model=model, messages=spec["messages"], max_tokens=1, temperature=0,
        extra_body={"prompt_logprobs": 0})
    out["prompt_logprobs"] = {
        "completion": scored.model_dump()["choices"][0]["prompt_logprobs"],
        "echo_top": [None if t is None else len(t) for t in scored.choices[0].logprobs.top_logprobs],
        "chat": chat_scored.model_dump().get("prompt_logprobs"),
        "stream": refused(stream=True, extra_body={"prompt_logprobs": 1}),
        "too_many": refused(extra_body={"prompt_logprobs": 21}),
        "whole_vocabulary": refused(extra_body={"prompt_logprobs": -1}),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
