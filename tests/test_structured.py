"""Structured outputs (gptoss.structured): grammars enforced while decoding, on a random-weight
model whose free output is gibberish, so every valid output is the constraint's doing."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from gptoss import LLM
from gptoss.structured import RETURN, StructuredOutputError, apply_masks, harmony_grammar, new_bitmask


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, max_num_seqs=32)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects, arrays, enums, required and optional keys, bounded numbers, strings with
    patterns: each bounded, so a constrained random model always finishes."""
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{1,5}$", "^[A-Z][0-9]{2}$", "^(yes|no)$",
                                                          "^[0-9]{3}-[0-9]{2}$"])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        # A fraction has no end a random model would find; multipleOf bounds it (JSON Schema's way).
        return {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    keys = rng.sample(["name", "age", "city", "tags", "score", "ok", "kind", "id"], rng.randint(1, 4))
    return {"type": "object", "properties": {k: random_schema(rng, depth + 1) for k in keys},
            "required": rng.sample(keys, rng.randint(0, len(keys))), "additionalProperties": False}


def test_masks_match_a_plain_unpacking():
    rng = torch.Generator().manual_seed(0)
    vocab = 100
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=rng)
    bitmask[2] = 0  # a row that allows nothing gets <|return|> only (not representable here: vocab 100)
    logits = torch.randn(3, vocab)
    rows = [0, 2]
    got = apply_masks(logits.clone(), bitmask, rows)
    for r in range(3):
        for t in range(vocab):
            allowed = r not in rows or bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1)
            assert (got[r, t] == logits[r, t]) if allowed else got[r, t] == float("-inf"), (r, t)
    wide = torch.zeros(1, RETURN + 10)
    stuck = apply_masks(wide, new_bitmask(1, RETURN + 10).zero_(), [0])
    assert torch.isfinite(stuck[0]).nonzero().flatten().tolist() == [RETURN]


def test_100_generated_schemas_all_parse_and_validate(llm):
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(100)]
    streams = [llm.generate_stream("Data:", json_schema=s, temperature=1.0, seed=i, max_tokens=400)
               for i, s in enumerate(schemas)]  # run as one batch
    valid = 0
    for schema, stream in zip(schemas, streams):
        result = stream.collect()
        assert result.finish_reason == "stop", (schema, result.text)
        jsonschema.validate(json.loads(result.text), schema)
        valid += 1
    assert valid == 100
    # Without the constraint the same model writes no JSON at all.
    free = llm.generate("Data:", temperature=1.0, seed=0, max_tokens=30)
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_regex_and_lark_grammar(llm):
    out = llm.generate("Code:", regex=r"[A-Z]{3}-[0-9]{4}", temperature=1.0, seed=1, max_tokens=20)
    assert out.finish_reason == "stop" and __import__("re").fullmatch(r"[A-Z]{3}-[0-9]{4}", out.text)
    out = llm.generate("Say:", grammar='start: "yes" | "no" | "maybe so"', temperature=1.0, seed=2, max_tokens=20)
    assert out.text in ("yes", "no", "maybe so")


def test_chat_final_answer_follows_the_schema_after_bounded_reasoning(llm):
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "unit": {"enum": ["km", "miles"]}},
              "required": ["answer", "unit"], "additionalProperties": False}
    for seed in range(4):
        result = llm.chat([{"role": "user", "content": "How far?"}], temperature=1.0, seed=seed, max_tokens=200,
                          response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": schema}},
                          max_reasoning_tokens=8)
        assert result.finish_reason == "stop"
        assert result.usage.reasoning_tokens <= 8
        jsonschema.validate(json.loads(result.text), schema)
    # Any object: a random model's strings need not end, but it starts as one and has no reasoning.
    result = llm.chat([{"role": "user", "content": "Hi"}], temperature=1.0, seed=9, max_tokens=40,
                      response_format={"type": "json_object"}, max_reasoning_tokens=0)
    assert result.text.startswith("{") and result.usage.reasoning_tokens == 0
    assert result.finish_reason == "length" or isinstance(json.loads(result.text), dict)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer",
                                                                                           "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_are_well_formed(llm, choice):
    for seed in range(4):
        result = llm.chat([{"role": "user", "content": "?"}], tools=[WEATHER, TIME], tool_choice=choice,
                          temperature=1.0, seed=seed, max_tokens=150, max_reasoning_tokens=4)
        assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 1, result
        call = result.tool_calls[0]["function"]
        if isinstance(choice, dict):
            assert call["name"] == "get_time"
        spec = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(call["arguments"]), spec)


def test_tool_choice_none_never_calls(llm):
    for seed in range(4):
        result = llm.chat([{"role": "user", "content": "?"}], tools=[WEATHER], tool_choice="none", temperature=1.0,
                          seed=seed, max_tokens=60, max_reasoning_tokens=4)
        assert not result.tool_calls and result.finish_reason in ("stop", "length")


def test_constrained_rows_are_batch_invariant(llm):
    schema = {"type": "object", "properties": {"v": {"type": "string", "maxLength": 8}}, "required": ["v"]}
    alone = llm.generate("X", json_schema=schema, temperature=1.0, seed=5, max_tokens=60)
    streams = [llm.generate_stream("Y" * i, temperature=1.0, seed=i, max_tokens=20) for i in range(1, 4)]
    streams.insert(1, llm.generate_stream("X", json_schema=schema, temperature=1.0, seed=5, max_tokens=60))
    together = [s.collect() for s in streams][1]
    assert together.token_ids == alone.token_ids


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"x": {"type": "strin"}}}, "json_schema.properties.x.type"),
    ({"type": "object", "required": "x"}, "json_schema.required"),
    ("not a schema", "json_schema"),
])
def test_invalid_schemas_name_the_part_at_fault(llm, schema, where):
    with pytest.raises(StructuredOutputError) as info:
        llm.generate("X", json_schema=schema, max_tokens=5)
    assert info.value.param == where, str(info.value)


def test_a_schema_that_cannot_finish_ends_with_length(llm):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 50}}, "required": ["s"]}
    result = llm.generate("X", json_schema=schema, temperature=1.0, seed=0, max_tokens=10)
    assert result.finish_reason == "length"


def test_harmony_grammar_shapes():
    grammar = harmony_grammar(answer_json=True, max_reasoning_tokens=5)
    assert "thought[max_tokens=4]" in grammar and "<|return|>" in grammar and "call_" not in grammar
    forced = harmony_grammar(functions=[], must_call=False)
    assert "final" in forced
    with pytest.raises(StructuredOutputError):
        harmony_grammar(must_call=True)
