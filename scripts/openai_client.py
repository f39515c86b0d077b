#!/usr/bin/env python3
"""The official `openai` Python client against `vkv serve`, unchanged: models, completions and chat
completions, whole and streamed (same seed, same text), usage, vLLM's extras through `extra_body`,
structured outputs (a JSON Schema, and the client's pydantic `parse`), and errors raised as the
client's own exception classes. Then the served `/openapi.json` is checked with
`openapi-spec-validator` (a valid OpenAPI 3.1 document describing every route). When it starts
the server itself, it then starts disaggregated serving too — a prefill instance (paged KV), a
decode instance (vmm KV) and `vkv route` in front — and checks that greedy answers through the
router, whole and streamed, are the colocated server's.

Either against a running server:

    python3 scripts/openai_client.py --url http://127.0.0.1:8000 [--api-key KEY]

or starting one (on a free port, with an API key) and stopping it with SIGTERM at the end:

    python3 scripts/openai_client.py --vkv target/debug/vkv [-- extra vkv serve options]

Needs `pip install openai openapi-spec-validator`. Exits non-zero on the first check that fails.
"""

import argparse
import json
import sys
import urllib.request

import openai
from openapi_spec_validator import validate as validate_openapi

from vkv_serve import parse_with_server, served


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print(f"ok: {what}")


def run_checks(base_url, api_key):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "none", max_retries=0)

    models = client.models.list()
    model = models.data[0].id
    check(models.data[0].object == "model", f"models.list() names the served model {model!r}")

    # Completions, whole and streamed, with the same seed.
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=12,
                  temperature=0.8, seed=5, extra_body={"ignore_eos": True, "top_k": 40})
    whole = client.completions.create(**kwargs)
    text = whole.choices[0].text
    check(whole.object == "text_completion" and whole.choices[0].finish_reason == "length",
          "completions.create: a text_completion that ran to max_tokens")
    check(whole.usage.completion_tokens == 12
          and whole.usage.total_tokens == whole.usage.prompt_tokens + 12,
          f"completion usage {whole.usage}")
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    check(streamed == text, f"streamed completion == whole completion ({text!r})")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12,
          "the stream's last chunk carries usage")

    # Chat, whole and streamed.
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": "Name a primary colour."}]
    chat = client.chat.completions.create(model=model, messages=messages,
                                          max_completion_tokens=16, temperature=0.7, seed=3)
    answer = chat.choices[0].message.content
    check(chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
          and answer, f"chat.completions.create answers {answer!r}")
    stream = client.chat.completions.create(model=model, messages=messages,
                                            max_completion_tokens=16, temperature=0.7, seed=3,
                                            stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    check("".join(pieces) == answer, "streamed chat == whole chat")

    # n choices (parallel sampling), whole and streamed alike for one seed.
    many = client.chat.completions.create(model=model, messages=messages, n=3,
                                          max_completion_tokens=8, temperature=0.9, seed=11)
    check([c.index for c in many.choices] == [0, 1, 2]
          and all(c.message.role == "assistant" for c in many.choices),
          f"n=3 gives three choices: {[c.message.content for c in many.choices]}")
    check(many.usage.prompt_tokens == chat.usage.prompt_tokens
          and 3 <= many.usage.completion_tokens <= 24,
          f"n=3 counts the prompt once and every choice's tokens: {many.usage}")
    texts = {i: "" for i in range(3)}
    for c in client.chat.completions.create(model=model, messages=messages, n=3, stream=True,
                                            max_completion_tokens=8, temperature=0.9, seed=11):
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    check([texts[i] for i in range(3)] == [c.message.content for c in many.choices],
          "streamed n=3 == whole n=3, choice by choice")

    # Log-probabilities, as the client's types read them.
    lp = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=6,
                                        temperature=0, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    check(len(content) == lp.usage.completion_tokens
          and "".join(t.token for t in content) == lp.choices[0].message.content
          and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
          and content[0].top_logprobs[0].token == content[0].token,
          f"chat logprobs: {[(t.token, round(t.logprob, 3)) for t in content]}")
    legacy = client.completions.create(model=model, prompt="The capital of France is",
                                       max_tokens=4, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    l = legacy.choices[0].logprobs
    check(len(l.tokens) == 4 and "".join(l.tokens) == legacy.choices[0].text
          and len(l.token_logprobs) == 4 and len(l.top_logprobs) == 4 and l.text_offset[0] == 0,
          f"completion logprobs: {list(zip(l.tokens, l.token_logprobs))}")
    echoed = client.completions.create(model=model, prompt="The capital of France is",
                                       max_tokens=3, temperature=0, logprobs=1, echo=True,
                                       extra_body={"ignore_eos": True})
    e = echoed.choices[0].logprobs
    check(echoed.choices[0].text.startswith("The capital of France is")
          and e.token_logprobs[0] is None
          and len(e.tokens) == echoed.usage.prompt_tokens + 3
          and all(x <= 0 for x in e.token_logprobs[1:]),
          f"echo with logprobs: the prompt's log-probabilities first: {list(zip(e.tokens, e.token_logprobs))}")
    beams = client.completions.create(model=model, prompt="The capital of France is",
                                      max_tokens=6, n=3, temperature=0,
                                      extra_body={"use_beam_search": True, "ignore_eos": True})
    texts = [c.text for c in beams.choices]
    check(len(set(texts)) == 3 and [c.index for c in beams.choices] == [0, 1, 2]
          and beams.usage.completion_tokens == 18,
          f"beam search (use_beam_search, n=3) gives three beams: {texts}")
    best = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5,
                                     n=1, best_of=3, seed=3, extra_body={"ignore_eos": True})
    check(len(best.choices) == 1 and best.usage.completion_tokens == 15,
          f"best_of=3 answers one choice and counts three samples: {best.choices[0].text!r}")
    penalised = client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=8,
                                          temperature=0, logit_bias={"1000": 100},
                                          extra_body={"ignore_eos": True})
    check(penalised.usage.completion_tokens == 8, "logit_bias is accepted by the client")

    # Structured outputs: a JSON Schema by hand, then the SDK's own pydantic helper (which writes
    # a strict schema: every field required, additionalProperties false, titles) parsing the answer.
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer", "minimum": 0, "maximum": 10**9}}}
    answer = client.chat.completions.create(
        model=model, max_tokens=100, temperature=0,
        messages=[{"role": "user", "content": "The largest city of France, as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "strict": True, "schema": schema}})
    city = json.loads(answer.choices[0].message.content)
    check(sorted(city) == ["city", "population"] and isinstance(city["population"], int)
          and answer.choices[0].finish_reason == "stop",
          f"response_format json_schema gives JSON that follows it: {city}")
    try:
        from pydantic import BaseModel

        class Pet(BaseModel):
            name: str
            legs: int
            vaccinated: bool

        parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
        parsed = parse(model=model, max_tokens=100, temperature=0, response_format=Pet,
                       messages=[{"role": "user", "content": "Describe a cat."}])
        pet = parsed.choices[0].message.parsed
        check(isinstance(pet, Pet), f"the client's parse(response_format=pydantic model): {pet!r}")
    except ImportError:
        print("skip: pydantic is not installed")
    try:
        client.chat.completions.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}})
        check(False, "an unsatisfiable schema is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "response_format",
              f"an unsatisfiable schema -> BadRequestError: {e.body.get('message')}")

    # Mistakes are the client's exceptions, with the field named.
    try:
        client.completions.create(model=model, prompt="a", temperature=5)
        check(False, "temperature=5 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == "temperature",
              f"temperature=5 -> BadRequestError naming the field: {e.body.get('message')}")
    try:
        client.completions.create(model="no-such-model", prompt="a", max_tokens=1)
        check(False, "an unknown model is refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "model", "unknown model -> BadRequestError (param model)")
    context = models.data[0].model_extra["max_model_len"]
    try:
        client.completions.create(model=model, prompt=[504] * context, max_tokens=1)
        check(False, "a prompt that fills the context is refused")
    except openai.BadRequestError as e:
        check(e.body.get("code") == "context_length_exceeded" and e.body.get("param") == "prompt",
              f"a prompt that fills the context -> {e.body.get('message')}")
    cut = client.completions.create(model=model, prompt=[504] * (context - 3), max_tokens=10**6,
                                    extra_body={"ignore_eos": True})
    check(cut.usage.completion_tokens == 3 and cut.choices[0].finish_reason == "length",
          "max_tokens beyond the context is cut to the room the prompt leaves")
    check_openapi(base_url, model)

    if api_key:
        wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
        try:
            wrong.models.list()
            check(False, "a wrong key is refused")
        except openai.AuthenticationError:
            check(True, "wrong API key -> AuthenticationError")


def check_openapi(base_url, model):
    """The served document is valid OpenAPI and describes what the server answers."""
    with urllib.request.urlopen(f"{base_url}/openapi.json") as r:
        doc = json.load(r)
    validate_openapi(doc)
    check(True, f"/openapi.json is a valid OpenAPI {doc['openapi']} document")
    routes = {"/v1/completions": ["post"], "/v1/chat/completions": ["post"],
              "/v1/models": ["get", "head"], "/health": ["get", "head"],
              "/metrics": ["get", "head"], "/openapi.json": ["get", "head"]}
    for path, methods in routes.items():
        check(all(m in doc["paths"].get(path, {}) for m in methods),
              f"the document describes {', '.join(m.upper() for m in methods)} {path}")
    schemas = doc["components"]["schemas"]
    check(schemas["CompletionRequest"]["required"] == ["prompt"]
          and schemas["ChatCompletionRequest"]["required"] == ["messages"],
          "the requests' required fields are prompt and messages")


def check_disaggregated(routed_url, colocated_url, model):
    """Greedy answers through `vkv route` (prefill and decode instances) equal the colocated
    server's, whole and streamed, read by the openai client."""
    routed = openai.OpenAI(base_url=f"{routed_url}/v1", api_key="sk-vkv-ci", max_retries=0)
    colocated = openai.OpenAI(base_url=f"{colocated_url}/v1", api_key="sk-vkv-ci", max_retries=0)
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
    a = routed.completions.create(**kwargs)
    b = colocated.completions.create(**kwargs)
    check(a.choices[0].text == b.choices[0].text and a.usage == b.usage,
          f"disaggregated completion == colocated ({a.choices[0].text!r})")
    messages = [{"role": "user", "content": "Name a primary colour."}]
    kwargs = dict(model=model, messages=messages, max_completion_tokens=16, temperature=0)
    pieces = [c.choices[0].delta.content or ""
              for c in routed.chat.completions.create(**kwargs, stream=True) if c.choices]
    whole = colocated.chat.completions.create(**kwargs).choices[0].message.content
    check("".join(pieces) == whole,
          f"disaggregated streamed chat == colocated whole chat ({whole!r})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api-key")
    args = parse_with_server(p)
    if args.url:
        run_checks(args.url.rstrip("/"), args.api_key)
        return
    key = args.api_key or "sk-vkv-ci"
    with served(args.vkv, ["--api-key", key, *args.serve_args]) as (base_url, _):
        run_checks(base_url, key)
        model = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key).models.list().data[0].id
        instance = ["--api-key", key, *args.serve_args]
        with served(args.vkv, ["--role", "prefill", "--kv-mode", "paged", *instance]) as (p, _), \
                served(args.vkv, ["--role", "decode", "--kv-mode", "vmm", *instance]) as (d, _), \
                served(args.vkv, ["--prefill", p, "--decode", d, "--api-key", key],
                       command="route") as (r, _):
            check_disaggregated(r, base_url, model)



if __name__ == "__main__":
    main()
