"""Tool calls through the official `openai` client: a forced call (`tool_choice: "required"`
and a named function), whole and streamed, then the conversation continued with the tool's
result. Prints one JSON object with what came back. (The forced calls take well under 200
tokens; the tools, written as transformers writes them, take 729 of the tiny models' 1024
positions with the Qwen3 test template.)

usage: tool_calls.py HOST:PORT MODEL
"""
import json
import sys

import jsonschema
from openai import OpenAI

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                      "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]


def valid(name, arguments):
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER if name == "get_weather" else TOOLS[1]["function"]["parameters"])
    return args


def main():
    addr, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
    out = {}
    required = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=1.0, seed=1, parallel_tool_calls=False)
    choice = required.choices[0]
    calls = choice.message.tool_calls or []
    out["required"] = {
        "finish_reason": choice.finish_reason,
        "calls": [[c.function.name, valid(c.function.name, c.function.arguments)] for c in calls],
        "ids": [c.id for c in calls],
    }
    named_choice = {"type": "function", "function": {"name": "get_weather"}}
    named = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=1.0, seed=2,
        tool_choice=named_choice)
    c = named.choices[0]
    named_calls = c.message.tool_calls or []
    out["named"] = {
        "finish_reason": c.finish_reason,
        "calls": [[t.function.name, valid(t.function.name, t.function.arguments)] for t in c.message.tool_calls or []],
        "ids": [t.id for t in named_calls],
    }
    # Streamed (the named call): each call arrives as delta.tool_calls, its id and name first, then its
    # arguments piece by piece, adding up to the whole answer's.
    acc, finish = {}, None
    for chunk in client.chat.completions.create(
            model=model, messages=MESSAGES, tools=TOOLS, tool_choice=named_choice, max_tokens=200,
            temperature=1.0, seed=2, stream=True):
        for ch in chunk.choices:
            for t in ch.delta.tool_calls or []:
                e = acc.setdefault(t.index, {"name": None, "id": None, "arguments": "", "deltas": 0})
                e["name"] = e["name"] or t.function.name
                e["id"] = e["id"] or t.id
                e["arguments"] += t.function.arguments or ""
                e["deltas"] += 1
            finish = ch.finish_reason or finish
    calls_streamed = [acc[i] for i in sorted(acc)]
    out["streamed"] = {
        "finish_reason": finish,
        "calls": [[e["name"], valid(e["name"], e["arguments"])] for e in calls_streamed],
        "arguments_equal": [e["arguments"] for e in calls_streamed] == [t.function.arguments for t in named_calls],
        "argument_deltas": [e["deltas"] for e in calls_streamed],
        "have_ids": all(e["id"] for e in calls_streamed),
        "ids": [e["id"] for e in calls_streamed],
    }
    # tool_choice auto: the model may answer in text; streamed, the text comes in pieces
    # (held back only where a call could be starting) and adds up to the whole answer.
    auto = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=24, temperature=1.0, seed=5,
        extra_body={"ignore_eos": True})
    pieces, auto_calls = [], []
    for chunk in client.chat.completions.create(
            model=model, messages=MESSAGES, tools=TOOLS, max_tokens=24, temperature=1.0, seed=5,
            stream=True, extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            auto_calls.extend(t.function.name for t in ch.delta.tool_calls or [] if t.function.name)
    whole_calls = [t.function.name for t in auto.choices[0].message.tool_calls or []]
    out["auto"] = {
        "same": "".join(pieces) == (auto.choices[0].message.content or "") and auto_calls == whole_calls,
        "content_chunks": len(pieces),
        "has_calls": bool(whole_calls),
    }
    # The result goes back and the conversation continues.
    first = calls[0]
    follow = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0, tools=TOOLS, tool_choice="none",
        messages=MESSAGES + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": first.id, "type": "function",
                 "function": {"name": first.function.name, "arguments": first.function.arguments}}]},
            {"role": "tool", "tool_call_id": first.id, "content": '{"forecast": "sunny"}'},
        ])
    out["follow_up"] = {
        "finish_reason": follow.choices[0].finish_reason,
        "content_is_text": isinstance(follow.choices[0].message.content, str),
        "prompt_tokens": follow.usage.prompt_tokens,
        "first_prompt_tokens": required.usage.prompt_tokens,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
