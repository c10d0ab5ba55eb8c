"""Reasoning kept apart (`--reasoning-parser qwen3`) and vLLM's chat-template fields, through
the official `openai` client, against a router serving Qwen3's real chat template. A regex
structured output makes the tiny model write `<think>...</think>` so the split is exercised.
Prints one JSON object with what came back.

usage: reasoning.py HOST:PORT MODEL
"""
import json
import re
import sys

import openai
from openai import OpenAI

THOUGHT = r"<think>[a-z]{3,12}</think>[a-z]{3,12}"
MESSAGES = [{"role": "user", "content": "Think, then answer."}]


def status_of(call):
    try:
        call()
        return [200, None]
    except openai.BadRequestError as e:
        return [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]


def main():
    addr, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
    out = {}
    # With thinking on, a grammar starts after the answer's `</think>` (below); with
    # `enable_thinking: false` the prompt has closed the thinking, so the regex holds from the
    # first token and makes the model write a thought.
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    forced = dict(model=model, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=3,
                  extra_body={"structured_outputs": {"regex": THOUGHT}, **no_thinking})
    whole = client.chat.completions.create(**forced).choices[0]
    reasoning = getattr(whole.message, "reasoning_content", None)
    out["whole"] = {"reasoning": reasoning, "content": whole.message.content,
                    "finish_reason": whole.finish_reason,
                    "matches": re.fullmatch(THOUGHT, f"<think>{reasoning}</think>{whole.message.content}") is not None}
    streamed = {"reasoning": "", "content": "", "reasoning_chunks": 0, "mixed_chunks": 0, "empty_chunks": 0}
    for chunk in client.chat.completions.create(**forced, stream=True):
        for ch in chunk.choices:
            piece = (ch.delta.model_extra or {}).get("reasoning_content")
            streamed["empty_chunks"] += not (piece or ch.delta.content or ch.delta.role or ch.finish_reason)
            if piece:
                streamed["reasoning"] += piece
                streamed["reasoning_chunks"] += 1
                streamed["mixed_chunks"] += bool(ch.delta.content)
            streamed["content"] += ch.delta.content or ""
    out["streamed"] = streamed
    hidden = client.chat.completions.create(**{**forced, "extra_body": {**forced["extra_body"], "include_reasoning": False}})
    out["hidden"] = {"has_reasoning": getattr(hidden.choices[0].message, "reasoning_content", None) is not None,
                     "content": hidden.choices[0].message.content}
    # The gate: a grammar waits for the answer's own `</think>` while the model may think (the
    # tiny model never writes one, so its answer stays free), and holds from the first token
    # once the prompt closed the thinking.
    digits = {"structured_outputs": {"regex": "[0-9]{3}"}}
    thinking_on = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                 temperature=0, extra_body=digits).choices[0]
    thinking_off = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                  temperature=0, extra_body={**digits, **no_thinking}).choices[0]
    out["gate"] = {"on": [thinking_on.message.content, thinking_on.finish_reason],
                   "off": [thinking_off.message.content, thinking_off.finish_reason]}
    # Qwen3's template closes an empty thinking block in the prompt when asked not to think.
    plain = dict(model=model, messages=MESSAGES, max_tokens=1, temperature=0)
    thinking = client.chat.completions.create(**plain).usage.prompt_tokens
    not_thinking = client.chat.completions.create(
        **plain, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
    out["prompt_tokens"] = {"thinking": thinking, "not_thinking": not_thinking}
    prefix = [*MESSAGES, {"role": "assistant", "content": "Sure, the answer"}]
    out["continued"] = status_of(lambda: client.chat.completions.create(
        model=model, messages=prefix, max_tokens=2, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True}))
    out["errors"] = {
        "continue_with_generation_prompt": status_of(lambda: client.chat.completions.create(
            model=model, messages=prefix, max_tokens=2, extra_body={"continue_final_message": True})),
        "reserved_kwarg": status_of(lambda: client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=2,
            extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})),
        "request_template": status_of(lambda: client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=2, extra_body={"chat_template": "{{ 'x' }}"})),
        "stop_token_id_out_of_range": status_of(lambda: client.completions.create(
            model=model, prompt="Hi", max_tokens=2, extra_body={"stop_token_ids": [1 << 30]})),
    }
    out["stop_token_ids_served"] = status_of(lambda: client.completions.create(
        model=model, prompt="Hi", max_tokens=2, extra_body={"stop_token_ids": [3, 4]}))
    # min_p = 1 leaves only the likeliest token: a draw at temperature 1 is then the greedy answer.
    greedy = client.completions.create(model=model, prompt="Once upon", max_tokens=12, temperature=0)
    only_best = client.completions.create(model=model, prompt="Once upon", max_tokens=12, temperature=1.0,
                                          seed=11, extra_body={"min_p": 1.0})
    sampled = client.completions.create(model=model, prompt="Once upon", max_tokens=12, temperature=1.0,
                                        seed=11)
    out["min_p"] = {"one_is_greedy": only_best.choices[0].text == greedy.choices[0].text,
                    "without_it_differs": sampled.choices[0].text != greedy.choices[0].text,
                    "out_of_range": status_of(lambda: client.completions.create(
                        model=model, prompt="Hi", max_tokens=2, extra_body={"min_p": 1.5}))}
    out["truncated_prompt_tokens"] = client.completions.create(
        model=model, prompt="A rather long prompt to cut", max_tokens=1, temperature=0,
        extra_body={"truncate_prompt_tokens": 2}).usage.prompt_tokens
    out["errors"]["truncate_below_minus_one"] = status_of(lambda: client.completions.create(
        model=model, prompt="Hi", max_tokens=1, extra_body={"truncate_prompt_tokens": -2}))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
