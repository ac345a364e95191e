"""Measure what the demo model can do, on held-out conversations, through `gptoss.LLM`.

    python -m gptoss.demo.evaluate [MODEL_DIR ...]

Every case comes from the evaluation split of `gptoss.demo.data` (problems, and function /
parameter / value combinations never trained on), drawn from a fixed seed; decoding is greedy
unless said otherwise. Requests run side by side on the engine, as a server would run them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import torch

from gptoss.demo.data import REFUSAL, TOOLS, ConversationGenerator

SEED = 20261202
_NUMBER = re.compile(r"-?\d+")


def _last_number(text: str) -> int | None:
    found = _NUMBER.findall(text)
    return int(found[-1]) if found else None


def _well_formed(result, encoding) -> bool:
    """The output parses as strict harmony and ends in an answer or a tool call."""
    from openai_harmony import Role

    try:
        messages = encoding.parse_messages_from_completion_tokens(result.token_ids, Role.ASSISTANT, strict=True)
    except Exception:
        return False
    if not messages or result.finish_reason not in ("stop", "tool_calls"):
        return False
    last = messages[-1]
    return last.channel == "final" or (last.channel == "commentary" and (last.recipient or "").startswith("functions."))


def _run(llm, requests: list[tuple[list[dict], list | None, str]], **sampling) -> list:
    """Start every request, then collect them (the engine batches them together)."""
    streams = [llm.chat_stream(messages, tools=tools, reasoning_effort=effort, **sampling)
               for messages, tools, effort in requests]
    return [s.collect() for s in streams]


def arithmetic_cases(generator: ConversationGenerator, count: int, rng: random.Random):
    """`count` held-out problems, half `What is A + B?`, half `What is A - B?`."""
    return [generator.arithmetic_case(rng, op="+-"[i % 2], phrase="What is {a} " + "+-"[i % 2] + " {b}?")
            for i in range(count)]


def tool_cases(generator: ConversationGenerator, count: int, rng: random.Random):
    """The issue's two examples, then held-out cases of every tool family in turn."""
    weather = next(t for t in TOOLS if t.kind == "weather")
    convert = next(t for t in TOOLS if t.kind == "convert")
    fixed = [
        ([{"role": "user", "content": "What's the weather in Lisbon?"}],
         [{"type": "function", "function": {"name": "get_weather", "description": weather.description,
                                            "parameters": {"type": "object", "properties": {
                                                "location": {"type": "string"}}, "required": ["location"]}}}],
         {"name": "get_weather", "arguments": {"location": "Lisbon"},
          "result": {"temperature": 18, "condition": "sunny"}}),
        ([{"role": "user", "content": "Convert 12 miles to km"}],
         [{"type": "function", "function": {"name": "convert", "description": convert.description,
                                            "parameters": {"type": "object", "properties": {
                                                "value": {"type": "number"}, "from_unit": {"type": "string"},
                                                "to_unit": {"type": "string"}},
                                                "required": ["value", "from_unit", "to_unit"]}}}],
         {"name": "convert", "arguments": {"value": 12, "from_unit": "miles", "to_unit": "km"},
          "result": {"value": 19.31}}),
    ]
    cases = [(m, t, "medium", e) for m, t, e in fixed]
    while len(cases) < count:
        case = generator.tool_case(rng, TOOLS[len(cases) % len(TOOLS)])
        cases.append((case.messages, case.tools, case.reasoning_effort, case.expected))
    return cases[:count]


def _values(result: dict) -> list[str]:
    return [str(v) for v in result.values()]


@torch.no_grad()
def unused_mass(llm, results, max_sequences: int = 64) -> tuple[float, float]:
    """Probability at temperature 1 on token ids whose lm_head row is zero (never seen in training),
    at each generated position: (mean, max)."""
    lm_head = llm.model.lm_head.weight
    unused = (lm_head.float() == 0).all(-1)
    if not bool(unused.any()):
        return 0.0, 0.0
    masses = []
    for result, prompt in results[:max_sequences]:
        tokens = torch.tensor(prompt + result.token_ids)[None]
        logits = llm.model(tokens)[0, len(prompt) - 1:-1].float()
        masses.append(torch.softmax(logits, -1)[:, unused].sum(-1))
    mass = torch.cat(masses)
    return float(mass.mean()), float(mass.max())


def evaluate(path: str | Path | None = None, arithmetic: int = 200, tools: int = 100, other: int = 50,
             second_turn: int = 100, seed: int = SEED, llm=None) -> dict:
    """The demo model's scores (shares from 0 to 1) on held-out cases."""
    from gptoss import LLM
    from gptoss import chat as harmony_chat

    llm = llm or LLM(path)
    generator = ConversationGenerator(llm.encoding, llm._text_encoding, "eval")
    rng = random.Random(seed)
    report: dict = {}

    # arithmetic, greedy and sampled at temperature 1
    problems = arithmetic_cases(generator, arithmetic, rng)
    requests = [(c.messages, None, c.reasoning_effort) for c in problems]
    greedy = _run(llm, requests, temperature=0, max_tokens=160)
    right = [_last_number(r.text) == c.expected["value"] for r, c in zip(greedy, problems)]
    report["arithmetic"] = sum(right) / len(problems)
    sampled = _run(llm, requests, temperature=1.0, max_tokens=160, seed=seed)
    report["arithmetic_t1"] = sum(_last_number(r.text) == c.expected["value"]
                                  for r, c in zip(sampled, problems)) / len(problems)
    formed = [_well_formed(r, llm.encoding) for r in greedy + sampled]

    # tools: the call, then the answer from the result
    cases = tool_cases(generator, tools, rng)
    calls = _run(llm, [(m, t, e) for m, t, e, _ in cases], temperature=0, max_tokens=120)
    formed += [_well_formed(r, llm.encoding) for r in calls]
    correct_calls = 0
    for r, (_, _, _, expected) in zip(calls, cases):
        call = r.tool_calls[0]["function"] if r.tool_calls and r.finish_reason == "tool_calls" else None
        try:
            ok = call is not None and call["name"] == expected["name"] \
                and json.loads(call["arguments"]) == expected["arguments"]
        except json.JSONDecodeError:
            ok = False
        correct_calls += ok
    report["tool_call"] = correct_calls / len(cases)
    followups = []
    for i, (messages, tool_list, effort, expected) in enumerate(cases):
        call_id = f"call_{i}"
        followups.append((messages + [
            {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": expected["name"], "arguments": json.dumps(expected["arguments"])}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(expected["result"])}], tool_list, effort))
    answers = _run(llm, followups, temperature=0, max_tokens=120)
    formed += [_well_formed(r, llm.encoding) for r in answers]
    report["tool_answer"] = sum(all(v in r.text for v in _values(e["result"]))
                                for r, (_, _, _, e) in zip(answers, cases)) / len(cases)

    # a second question, after an earlier exchange
    seconds = []
    for _ in range(second_turn):
        case = generator.arithmetic_case(rng)
        case.messages[-1:-1] = generator.history(rng)
        seconds.append(case)
    replies = _run(llm, [(c.messages, c.tools, c.reasoning_effort) for c in seconds], temperature=0, max_tokens=160)
    formed += [_well_formed(r, llm.encoding) for r in replies]
    report["second_turn"] = sum(_last_number(r.text) == c.expected["value"]
                                for r, c in zip(replies, seconds)) / len(seconds)

    # anything else
    others = [generator.other_case(rng) for _ in range(other)]
    refusals = _run(llm, [(c.messages, c.tools, c.reasoning_effort) for c in others], temperature=0,
                    max_tokens=120)
    formed += [_well_formed(r, llm.encoding) for r in refusals]
    report["other"] = sum(r.text.strip() == REFUSAL for r in refusals) / len(others)
    report["well_formed"] = sum(formed) / len(formed)

    prompts = [harmony_chat.render_prompt(llm.encoding, c.messages, reasoning_effort=c.reasoning_effort)
               for c in problems]
    report["unused_mass_mean"], report["unused_mass_max"] = unused_mass(llm, list(zip(sampled, prompts)))
    report["counts"] = {"arithmetic": len(problems), "tools": len(cases), "second_turn": len(seconds),
                        "other": len(others), "well_formed": len(formed)}
    return report


ROWS = (("arithmetic", "arithmetic, greedy (`What is A + B?` / `A - B?`)"),
        ("arithmetic_t1", "arithmetic, temperature 1.0"),
        ("second_turn", "arithmetic as the second question of a conversation"),
        ("tool_call", "tool call: right function, exactly the right arguments"),
        ("tool_answer", "answer after the tool result holds its values"),
        ("other", "anything else: the fixed sentence"),
        ("well_formed", "well-formed harmony (strict parse, ends in an answer or a call)"))


def format_report(reports: dict[str, dict]) -> str:
    names = list(reports)
    lines = ["| skill | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{100 * reports[n][key]:.1f}%" for n in names) + " |")
    lines.append("| probability on never-seen tokens, temperature 1 (mean / max per token) | "
                 + " | ".join(f"{100 * reports[n]['unused_mass_mean']:.3f}% / {100 * reports[n]['unused_mass_max']:.2f}%"
                              for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from gptoss.demo import demo_model_path

    paths = [Path(p) for p in argv] or [demo_model_path()]
    reports = {p.name: evaluate(p) for p in paths}
    print(format_report(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
