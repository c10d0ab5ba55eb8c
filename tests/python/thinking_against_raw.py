"""A thinking model's answer through the official `openai` client, under the router's
`--reasoning-parser` (`minimax_m2`, `minimax_m2_append_think`, `kimi_k2`): one chat answer whole and
streamed, beside the raw text the model wrote for the same prompt (its tokens from vLLM's
`/tokenize`, completed as they are). Prints one JSON object with what came back.

usage: thinking_against_raw.py HOST:PORT MODEL
"""
import json
import sys
import urllib.request

from openai import OpenAI

MESSAGES = [{"role": "user", "content": "Think, then answer."}]


def main():
    addr, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
    asked = dict(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**asked).choices[0]
    out = {"whole": {"content": whole.message.content,
                     "reasoning": getattr(whole.message, "reasoning_content", None),
                     "finish_reason": whole.finish_reason}}
    streamed = {"content": "", "reasoning": "", "first_content": None}
    for chunk in client.chat.completions.create(**asked, stream=True):
        for ch in chunk.choices:
            piece = (ch.delta.model_extra or {}).get("reasoning_content")
            streamed["reasoning"] += piece or ""
            if ch.delta.content:
                if streamed["first_content"] is None:
                    streamed["first_content"] = ch.delta.content
                streamed["content"] += ch.delta.content
    out["streamed"] = streamed
    body = json.dumps({"model": model, "messages": MESSAGES}).encode()
    req = urllib.request.Request(f"http://{addr}/tokenize", data=body, headers={
        "Authorization": "Bearer unused", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        prompt = json.load(r)["tokens"]
    raw = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    out["raw"] = raw.choices[0].text
    print(json.dumps(out))


if __name__ == "__main__":
    main()
