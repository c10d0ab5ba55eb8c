"""Structured outputs through the official `openai` client: for each kind (a bounded JSON
schema, any JSON object, a regex, a choice), SEEDS sampled answers at temperature 1; prints
one JSON object saying, per kind, how many parsed and validated (with the `jsonschema`
package) and ended with finish_reason "stop", and the first failure, if any.

usage: structured_outputs.py HOST:PORT MODEL SEEDS
"""
import json
import re
import sys

import jsonschema
import openai
from openai import OpenAI

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 99},
                "verified": {"type": "boolean"},
            },
            "required": ["age", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,6}-[0-9]{2,4}"
CHOICES = ["alpha", "beta", "gamma delta"]


def main():
    addr, model, seeds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = OpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0)
    kinds = {
        "json_schema": (
            dict(response_format={"type": "json_schema",
                                  "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}),
            lambda text: jsonschema.validate(json.loads(text), SCHEMA),
        ),
        "json_object": (
            dict(response_format={"type": "json_object"}),
            lambda text: isinstance(json.loads(text), dict) or (_ for _ in ()).throw(ValueError("not an object")),
        ),
        "regex": (
            dict(extra_body={"structured_outputs": {"regex": REGEX}}),
            lambda text: re.fullmatch(REGEX, text) or (_ for _ in ()).throw(ValueError("no match")),
        ),
        "choice": (
            dict(extra_body={"structured_outputs": {"choice": CHOICES}}),
            lambda text: text in CHOICES or (_ for _ in ()).throw(ValueError("not a choice")),
        ),
    }
    out = {}
    for kind, (kwargs, check) in kinds.items():
        ok, cut, failure = 0, 0, None
        for seed in range(seeds):
            done = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Describe a pet."}],
                # Any JSON object is unbounded: a random model may write long strings before
                # it closes one, so it gets the whole context.
                max_tokens=960 if kind == "json_object" else 400,
                temperature=1.0,
                seed=seed,
                **kwargs,
            )
            choice = done.choices[0]
            text = choice.message.content
            if kind == "json_object" and choice.finish_reason == "length":
                # Any JSON object is unbounded, and a random-weight model closes a string
                # with probability ~1/vocab per token: it may still be inside one at the end
                # of the context. Counted apart, never as valid.
                cut += 1
                continue
            try:
                check(text)
                if choice.finish_reason != "stop":
                    raise ValueError(f"finish_reason {choice.finish_reason}")
                ok += 1
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                failure = failure or f"seed {seed}: {e!r}: {text!r}"
        out[kind] = {"ok": ok, "cut": cut, "first_failure": failure}
    # Streamed, the same answer in pieces.
    kwargs = kinds["json_schema"][0]
    whole = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a pet."}], max_tokens=400,
        temperature=1.0, seed=3, **kwargs).choices[0].message.content
    pieces = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a pet."}], max_tokens=400,
        temperature=1.0, seed=3, stream=True, **kwargs)
    out["streamed_equals_whole"] = "".join(
        c.choices[0].delta.content or "" for c in pieces if c.choices) == whole
    # The same answers whether the router picks from the row it keeps (no logprobs asked: the
    # grammar's mask and the penalties are applied where the dense part runs) or samples from
    # the whole row it takes back for the logprobs: races, a top-k draw, greedy.
    same = []
    for kind, extra in [
        ("json_schema", {}),
        ("regex", {"presence_penalty": 0.8, "frequency_penalty": 0.5}),
        ("choice", {"temperature": 0.0, "presence_penalty": 0.3}),
        ("json_schema", {"extra_body": {"top_k": 5}}),
    ]:
        kwargs = dict(kinds[kind][0])
        if "extra_body" in extra:
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra.pop("extra_body")}
        for seed in range(3):
            def answer(**more):
                params = dict(temperature=1.0, seed=seed, max_tokens=400)
                params.update(kwargs, **extra, **more)
                return client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Describe a pet."}],
                    **params).choices[0].message.content
            same.append(answer() == answer(logprobs=True))
    out["picked_equals_sampled"] = same
    errors = {}
    # Chains the grammar compiler recurses along, one level per link: 20,000 Lark rules each
    # naming the next, 5,000 schema definitions each referring to the next. Compiled, they
    # overflowed its stack and aborted the router.
    lark_chain = "start: r1\n" + "".join(f'r{i}: "x" r{i + 1} | "y"\n' for i in range(1, 20000)) + 'r20000: "z"\n'
    defs = {f"d{i}": {"type": "object", "properties": {"n": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(5000)}
    defs["d5000"] = {"type": "string"}
    ref_chain = {"$defs": defs, "allOf": [{"$ref": "#/$defs/d0"}]}
    for name, kwargs in {
        "bad_schema": dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
        "bad_regex": dict(extra_body={"structured_outputs": {"regex": "(unclosed"}}),
        "deep_grammar": dict(extra_body={"structured_outputs": {"grammar": lark_chain}}),
        "deep_refs": dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": ref_chain}}),
    }.items():
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4, **kwargs)
            errors[name] = "accepted"
        except openai.BadRequestError as e:
            errors[name] = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
    out["errors"] = errors
    # And the router still answers.
    after = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=400, seed=1,
        extra_body={"structured_outputs": {"regex": REGEX}}).choices[0].message.content
    out["answers_after_errors"] = re.fullmatch(REGEX, after) is not None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
