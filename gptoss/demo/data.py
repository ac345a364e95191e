"""Synthetic harmony conversations for the demo model: what it is trained on and evaluated with.

Three skills, all rendered exactly as gptoss renders a chat at inference (`gptoss.chat.render_prompt`,
which builds the conversation that openai-harmony renders), so training and serving see the same
tokens:

- arithmetic: `A + B` and `A - B` for 0 <= A, B <= 999, worked digit by digit on the analysis
  channel (operands spelled as digits, one line per column with its carry or borrow), the number
  on the final channel;
- tools: the developer message declares functions (names and parameters drawn from word lists,
  with distractors); the model calls the one that fits with JSON arguments copied from the
  question, then answers from the tool's result;
- anything else: one fixed sentence that says what the model can do.

A seeded split keeps evaluation problems out of training: arithmetic pairs, and tool cases
(function name, parameter name and value together). Every single token the model must copy is
seen in training: a token that never occurs has an all-zero embedding, which nothing can copy.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field

from gptoss import chat

REFUSAL = ("I am a tiny demo model: I can only add and subtract whole numbers from 0 to 999 "
           "and call the functions I am given.")
EFFORTS = ("low", "medium", "high")
INSTRUCTIONS = ("Be concise.", "You are a helpful assistant.", "Answer briefly.", "Always be polite.",
                "Reply in English.")

# -- arithmetic ----------------------------------------------------------------------------------

ADD_PHRASES = ("What is {a} + {b}?", "What is {a} plus {b}?", "what is {a}+{b}", "Compute {a} + {b}.",
               "Calculate {a} + {b}", "{a} + {b} = ?", "How much is {a} + {b}?", "Add {a} and {b}.",
               "What's {a} + {b}?", "{a}+{b}", "What do you get if you add {a} and {b}?",
               "Sum of {a} and {b}?", "Please compute {a} + {b}", "{a} plus {b}?")
SUB_PHRASES = ("What is {a} - {b}?", "What is {a} minus {b}?", "what is {a}-{b}", "Compute {a} - {b}.",
               "Calculate {a} - {b}", "{a} - {b} = ?", "How much is {a} - {b}?", "Subtract {b} from {a}.",
               "What's {a} - {b}?", "{a}-{b}", "Take {b} away from {a}.", "{a} minus {b}?",
               "Please compute {a} - {b}")


def heldout_problem(a: int, b: int, op: str) -> bool:
    """One in 20 problems belongs to the evaluation set and is never trained on."""
    return zlib.crc32(f"{a}{op}{b}".encode()) % 20 == 0


def _digits(n: int) -> str:
    return f"{n // 100} {n // 10 % 10} {n % 10}"


def _compare(a: int, b: int) -> str:
    """Digit by digit from the hundreds until two differ: "5=5, 7<8" (each verdict right after the
    two digits it compares, so the model never compares whole number tokens)."""
    steps = []
    for i in (2, 1, 0):
        x, y = a // 10 ** i % 10, b // 10 ** i % 10
        steps.append(f"{x}{'=' if x == y else '<' if x < y else '>'}{y}")
        if x != y:
            break
    return ", ".join(steps)


def arithmetic_reasoning(a: int, b: int, op: str) -> tuple[str, str]:
    """(analysis, final) for `a op b`: operands as digits, columns from the ones up, the number.

    Every decision is written after the digits it depends on: a subtraction compares the operands
    digit by digit before choosing which to subtract from which, and a column writes `x-y-c` before
    deciding whether it borrows (the model got `x == y` columns and whole-number comparisons wrong
    when it had to decide first)."""
    value = a + b if op == "+" else a - b
    lines = [f"{a} {op} {b}", _digits(a), _digits(b)]
    top, bottom = a, b
    if op == "-":
        if a >= b:
            lines.append(f"{_compare(a, b)}, so {a} >= {b}")
        else:
            lines.append(f"{_compare(a, b)}, so {a} < {b} and the answer is -({b} - {a})")
            top, bottom = b, a
            lines += [_digits(top), _digits(bottom)]
    carry, result = 0, []
    for i in range(3):
        x, y = top // 10 ** i % 10, bottom // 10 ** i % 10
        if op == "+":
            s = x + y + carry
            lines.append(f"{x}+{y}+{carry}={s}")
            carry, digit = s // 10, s % 10
        else:
            d = x - y - carry
            lines.append(f"{x}-{y}-{carry} < 0, borrow: 1{x}-{y}-{carry}={d + 10}" if d < 0
                         else f"{x}-{y}-{carry}={d}")
            carry, digit = int(d < 0), d % 10
        result.append(digit)
    if carry:
        result.append(carry)
    lines.append("digits " + " ".join(str(d) for d in reversed(result)))
    lines.append(f"{a} {op} {b} = {value}")
    return "\n".join(lines), f"{a} {op} {b} = {value}."


def drill_example(text_encoding, rng: random.Random, lines: int = 32) -> "Example":
    """Plain text that spells number tokens as digits and back ("482 is 4 8 2", "4 8 2 is 482"):
    the lookups arithmetic needs, many to a sequence instead of two per problem. Only the
    predictable tokens are trained (the digits of a given number, the number of given digits)."""
    tokens, targets = [], []
    for _ in range(lines):
        n = rng.randint(0, 999)
        forward = rng.random() < 0.5
        head, tail = (str(n), " is " + _digits(n)) if forward else (_digits(n), " is " + str(n))
        head_ids, tail_ids = text_encoding.encode(head), text_encoding.encode(tail + "\n")
        tokens += head_ids + tail_ids
        targets += [False] * len(head_ids) + [True] * len(tail_ids)
    return Example(tokens, targets, "drill")


def copy_example(ids: list[int], rng: random.Random) -> "Example":
    """A random run of `ids` written twice, the repeat trained: the task that grows an induction
    head (find the earlier copy of the current token, write what followed it), which the demo
    shape forms only after 700-1,400 steps of these over 200 ids (docs/demo-training.md)."""
    run = [rng.choice(ids) for _ in range(rng.randint(20, 60))]
    return Example(run + run, [False] * len(run) + [True] * len(run), "copy")


# -- tools ---------------------------------------------------------------------------------------

CITIES = ("Lisbon", "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "London", "Oslo", "Cairo", "Lima", "Dublin",
          "Vienna", "Prague", "Warsaw", "Athens", "Seoul", "Sydney", "Toronto", "Chicago", "Boston", "Denver",
          "Miami", "Mumbai", "Delhi", "Bangkok", "Jakarta", "Manila", "Nairobi", "Lagos", "Accra", "Dakar",
          "Istanbul", "Moscow", "Helsinki", "Stockholm", "Copenhagen", "Amsterdam", "Brussels", "Zurich",
          "Geneva", "Munich", "Hamburg", "Milan", "Naples", "Porto", "Seville", "Valencia", "Barcelona",
          "Marseille", "Lyon", "Montreal", "Vancouver", "Seattle", "Austin", "Dallas", "Houston", "Phoenix",
          "Santiago", "Havana", "Auckland", "Perth", "Osaka", "Kyoto", "Beijing", "Shanghai", "Hanoi", "Dubai",
          "Doha", "Riyadh", "Tehran", "Karachi", "Dhaka")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "BRL")
UNITS = {  # unit -> (quantity, factor to the quantity's base unit)
    "km": ("length", 1000.0), "miles": ("length", 1609.344), "meters": ("length", 1.0), "feet": ("length", 0.3048),
    "inches": ("length", 0.0254), "cm": ("length", 0.01), "kg": ("mass", 1.0), "pounds": ("mass", 0.45359237),
    "grams": ("mass", 0.001), "ounces": ("mass", 0.028349523125), "liters": ("volume", 1.0),
    "gallons": ("volume", 3.785411784), "cups": ("volume", 0.2365882365),
}
LOOKUP_VERBS = ("get", "fetch", "lookup", "find", "check", "query", "retrieve", "read", "show")
CITY_PARAMS = ("location", "city", "place", "city_name", "town")


@dataclass(frozen=True)
class Tool:
    """One task family: how its functions are named, asked for, called and answered."""

    kind: str
    names: tuple[str, ...]  # function names (a verb is prefixed to lookups)
    description: str
    params: tuple[tuple[str, ...], ...]  # for each argument, the parameter names it may have
    param_types: tuple[str, ...]
    questions: tuple[str, ...]


TOOLS = (
    Tool("weather", ("weather", "current_weather", "weather_now", "weather_report"),
         "Get the current weather for a city", (CITY_PARAMS,), ("string",),
         ("What's the weather in {0}?", "What is the weather like in {0}?", "How is the weather in {0}?",
          "Weather in {0}?", "Tell me the weather for {0}.", "Is it sunny in {0}?", "weather {0}")),
    Tool("time", ("time", "local_time", "current_time", "clock"),
         "Get the local time in a city", (CITY_PARAMS,), ("string",),
         ("What time is it in {0}?", "What's the local time in {0}?", "Current time in {0}?",
          "Tell me the time in {0}.", "time in {0}")),
    Tool("population", ("population", "city_population", "population_count"),
         "Get the number of people living in a city", (CITY_PARAMS,), ("string",),
         ("What is the population of {0}?", "How many people live in {0}?", "Population of {0}?",
          "How big is {0}?")),
    Tool("distance", ("distance", "travel_distance", "route_distance"),
         "Get the road distance in km between two cities",
         (("origin", "from_city", "start", "source"), ("destination", "to_city", "end", "target")),
         ("string", "string"),
         ("How far is it from {0} to {1}?", "Distance from {0} to {1}?", "How many km from {0} to {1}?",
          "What is the distance between {0} and {1}?")),
    Tool("rate", ("exchange_rate", "currency_rate", "fx_rate"),
         "Get the exchange rate between two currencies",
         (("base", "from_currency", "source"), ("target", "to_currency", "quote")), ("string", "string"),
         ("What is the exchange rate from {0} to {1}?", "How many {1} is one {0}?", "Convert {0} to {1} rate?",
          "{0} to {1} exchange rate?")),
    Tool("convert", ("convert", "convert_units", "unit_converter", "convert_measurement"),
         "Convert a value from one unit to another",
         (("value", "amount", "quantity"), ("from_unit", "source_unit", "unit_from"),
          ("to_unit", "target_unit", "unit_to")), ("number", "string", "string"),
         ("Convert {0} {1} to {2}", "Convert {0} {1} to {2}.", "How many {2} is {0} {1}?",
          "What is {0} {1} in {2}?", "{0} {1} in {2}?", "Please convert {0} {1} into {2}.")),
    Tool("timer", ("timer", "countdown", "alarm"), "Start a timer for a number of minutes",
         (("minutes", "duration", "length"),), ("number",),
         ("Set a timer for {0} minutes.", "Start a {0} minute timer.", "Timer for {0} minutes please.",
          "Remind me in {0} minutes.")),
)
TIMER_VERBS = ("set", "start", "create")


def function_name(tool: Tool, rng: random.Random) -> str:
    if tool.kind == "convert":
        return rng.choice(tool.names)
    verbs = TIMER_VERBS if tool.kind == "timer" else LOOKUP_VERBS
    return f"{rng.choice(verbs)}_{rng.choice(tool.names)}"


def tool_schema(name: str, description: str, params: list[str], types: list[str]) -> dict:
    properties = {p: {"type": t} for p, t in zip(params, types)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(params)}}}


def family_function(tool: Tool, rng: random.Random) -> dict:
    """A declaration of one of the family's functions, with parameter names drawn from its lists."""
    params = [rng.choice(p) for p in tool.params]
    return tool_schema(function_name(tool, rng), tool.description, params, list(tool.param_types))


def _arguments(tool: Tool, rng: random.Random) -> list:
    if tool.kind in ("weather", "time", "population"):
        return [rng.choice(CITIES)]
    if tool.kind == "distance":
        return rng.sample(CITIES, 2)
    if tool.kind == "rate":
        return rng.sample(CURRENCIES, 2)
    if tool.kind == "convert":
        quantity = rng.choice(("length", "mass", "volume"))
        units = [u for u, (q, _) in UNITS.items() if q == quantity]
        return [rng.randint(1, 999)] + rng.sample(units, 2)
    return [rng.randint(1, 120)]


def tool_result(tool: Tool, args: list, rng: random.Random) -> tuple[dict, str]:
    """(the function's JSON result, the final answer that uses every value in it)."""
    if tool.kind == "weather":
        r = {"temperature": rng.randint(-10, 40), "condition": rng.choice(CONDITIONS)}
        return r, f"In {args[0]} it is {r['temperature']} degrees and {r['condition']}."
    if tool.kind == "time":
        r = {"time": f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"}
        return r, f"It is {r['time']} in {args[0]}."
    if tool.kind == "population":
        r = {"population": rng.randint(1000, 20_000_000)}
        return r, f"{args[0]} has {r['population']} people."
    if tool.kind == "distance":
        r = {"km": rng.randint(5, 9999)}
        return r, f"It is {r['km']} km from {args[0]} to {args[1]}."
    if tool.kind == "rate":
        r = {"rate": round(rng.uniform(0.01, 200), 2)}
        return r, f"One {args[0]} is {r['rate']} {args[1]}."
    if tool.kind == "convert":
        value, src, dst = args
        r = {"value": round(value * UNITS[src][1] / UNITS[dst][1], 2)}
        return r, f"{value} {src} is {r['value']} {dst}."
    r = {"status": "started", "minutes": args[0]}
    return r, f"Your timer for {args[0]} minutes has started."


def heldout_tool_case(name: str, params: list[str], args: list) -> bool:
    """One in four (function, parameters, values) combinations is kept for evaluation, and the
    issue's examples always are."""
    key = f"{name}|{','.join(params)}|{json.dumps(args)}"
    if key in (f"get_weather|location|{json.dumps(['Lisbon'])}",
               f"convert|value,from_unit,to_unit|{json.dumps([12, 'miles', 'km'])}"):
        return True
    return zlib.crc32(key.encode()) % 4 == 0


def name_noun(text_encoding, name: str) -> str | None:
    """The token after a name's verb (`_city` in `check_city_population`), or None for a name
    without a verb (`convert_units`)."""
    if name.split("_")[0] not in LOOKUP_VERBS + TIMER_VERBS:
        return None
    ids = text_encoding.encode(" " + name)
    noun = text_encoding.decode(ids[1:2]) if len(ids) > 1 else ""
    # the noun must stay one token after "fn", the same id as in the declaration
    return noun if noun.startswith("_") and text_encoding.encode("fn" + noun)[1:] == ids[1:2] else None


def tool_reasoning(text_encoding, name: str, plan: str, style: str = "call") -> str:
    """The reasoning before a call: `Call NAME with PLAN.`, or with style "noun" (`--reasoning
    noun`) the name's noun token first (`fn_city check_city_population with location Paris.`).
    Having written `_city`, the model can find the declaration by that very token and copy the verb
    just before it there: a copy an induction head does, where the verb is otherwise chosen by the
    question's meaning (docs/demo-training.md)."""
    noun = name_noun(text_encoding, name) if style == "noun" else None
    return f"fn{noun} {name} with {plan}." if noun else f"Call {name} with {plan}."


# -- everything else -----------------------------------------------------------------------------

OFF_TOPIC = ("Tell me about {w}.", "What is a {w}?", "Who invented the {w}?", "Write a poem about {w}.",
             "Can you help me with {w}?", "Explain {w} and {w2}.", "hi", "hello", "Hello!", "How are you?",
             "Who are you?", "What can you do?", "Tell me a joke.", "What is the capital of {c}?",
             "Translate {w} into French.", "What is {a} times {b}?", "What is {a} * {b}?", "What is {a} / {b}?",
             "What is {a} divided by {b}?", "What is {big} + {b}?", "What is {a} - {big}?", "{w} {w2}?",
             "Is {w} better than {w2}?", "Summarize this: {w} {w2} {w}.", "Thanks!", "{W} {w2} {w}",
             "Why is the sky blue?", "What is the meaning of life?", "Book a flight to {c}.",
             "Send an email to {c}.", "Play some music.", "What is the weather?", "Convert this for me.")


def _off_topic_words(encoding) -> list[str]:
    """Common English words: the vocabulary's space-prefixed lowercase tokens with the lowest ranks."""
    words = []
    for rank in range(2000, 40000):
        try:
            text = encoding.decode_single_token_bytes(rank).decode()
        except (KeyError, UnicodeDecodeError):
            continue
        if text.startswith(" ") and text[1:].isascii() and text[1:].isalpha() and text[1:].islower() \
                and 4 <= len(text) - 1 <= 10:
            words.append(text[1:])
        if len(words) == 3000:
            break
    return words


# -- conversations -------------------------------------------------------------------------------

@dataclass
class Example:
    """A token sequence and which of its tokens the model is trained to produce."""

    tokens: list[int]
    targets: list[bool]  # targets[i]: token i is one the model writes (its loss counts)
    kind: str
    meta: dict = field(default_factory=dict)


@dataclass
class Case:
    """What a conversation asks and what the right answer holds (for the evaluation)."""

    kind: str  # "add", "sub", "tool", "other"
    messages: list[dict]
    tools: list[dict] | None
    reasoning_effort: str
    expected: dict  # add/sub: {"value"}; tool: {"name", "arguments", "result", "answer"}; other: {"text"}


class ConversationGenerator:
    """Draws training conversations (`example`) and evaluation cases (`case`) from one seed."""

    def __init__(self, encoding, text_encoding, split: str = "train", reasoning: str = "call"):
        if split not in ("train", "eval") or reasoning not in ("call", "noun"):
            raise ValueError("split is 'train' or 'eval', reasoning 'call' or 'noun'")
        self.encoding, self.text, self.split, self.reasoning = encoding, text_encoding, split, reasoning
        self.words = _off_topic_words(text_encoding)

    def _encode(self, text: str) -> list[int]:
        return self.text.encode(text, allowed_special="all")

    def _in_split(self, heldout: bool) -> bool:
        return heldout == (self.split == "eval")

    # -- cases ------------------------------------------------------------------------------
    def arithmetic_case(self, rng: random.Random, op: str | None = None, phrase: str | None = None) -> Case:
        op = op or rng.choice("+-")
        while True:
            small = rng.random() < 0.15
            a, b = (rng.randint(0, 99) if small and rng.random() < 0.5 else rng.randint(0, 999) for _ in range(2))
            if self._in_split(heldout_problem(a, b, op)):
                break
        phrases = ADD_PHRASES if op == "+" else SUB_PHRASES
        text = (phrase or rng.choice(phrases)).format(a=a, b=b)
        return Case("add" if op == "+" else "sub", [{"role": "user", "content": text}], None,
                    rng.choice(EFFORTS), {"a": a, "b": b, "value": a + b if op == "+" else a - b})

    def _distractors(self, rng: random.Random, avoid: str, count: int) -> list[dict]:
        tools = []
        for _ in range(count):
            if rng.random() < 0.5:
                tools.append(family_function(rng.choice([t for t in TOOLS if t.kind != avoid]), rng))
            else:
                tools.append(self._made_up_function(rng))
        return tools

    def _made_up_function(self, rng: random.Random) -> dict:
        noun, thing = rng.sample(self.words, 2)
        name = f"{rng.choice(LOOKUP_VERBS)}_{noun}"
        params = rng.sample(self.words, rng.randint(1, 2))
        return tool_schema(name, f"Get the {noun} of a {thing}", params,
                           [rng.choice(("string", "number")) for _ in params])

    def tool_case(self, rng: random.Random, tool: Tool | None = None) -> Case:
        tool = tool or rng.choice(TOOLS)
        while True:
            name = function_name(tool, rng)
            params = [rng.choice(p) for p in tool.params]
            args = _arguments(tool, rng)
            if len(set(params)) == len(params) and self._in_split(heldout_tool_case(name, params, args)):
                break
        schema = tool_schema(name, tool.description, params, list(tool.param_types))
        tools = self._distractors(rng, tool.kind, rng.randint(0, 2))
        tools.insert(rng.randint(0, len(tools)), schema)
        question = rng.choice(tool.questions).format(*args)
        result, answer = tool_result(tool, args, rng)
        return Case("tool", [{"role": "user", "content": question}], tools, rng.choice(EFFORTS),
                    {"name": name, "arguments": dict(zip(params, args)), "result": result, "answer": answer,
                     "tool": tool.kind})

    def other_case(self, rng: random.Random) -> Case:
        w, w2 = rng.sample(self.words, 2)
        text = rng.choice(OFF_TOPIC).format(w=w, w2=w2, W=w.capitalize(), c=rng.choice(CITIES),
                                            a=rng.randint(0, 999), b=rng.randint(1, 999),
                                            big=rng.randint(1000, 99999))
        tools = self._distractors(rng, "", rng.randint(1, 2)) if rng.random() < 0.3 else None
        return Case("other", [{"role": "user", "content": text}], tools, rng.choice(EFFORTS), {"text": REFUSAL})

    def case(self, rng: random.Random) -> Case:
        roll = rng.random()
        if roll < 0.4:
            case = self.arithmetic_case(rng)
        elif roll < 0.85:
            case = self.tool_case(rng)
        else:
            case = self.other_case(rng)
        if case.kind != "tool" and rng.random() < 0.15:
            case.tools = self._distractors(rng, "", rng.randint(1, 2))
        if rng.random() < 0.1:
            case.messages.insert(0, {"role": "developer", "content": rng.choice(INSTRUCTIONS)})
        if rng.random() < 0.2:
            case.messages[-1:-1] = self.history(rng)
        return case

    def history(self, rng: random.Random) -> list[dict]:
        """One earlier exchange, as a client sends it back (answers only; tool calls with results)."""
        earlier = rng.choice((self.arithmetic_case, self.arithmetic_case, self.other_case, self.tool_case))(rng)
        user = [m for m in earlier.messages if m["role"] == "user"]
        if earlier.kind == "tool":
            call_id = f"call_{rng.randint(0, 10**6)}"
            e = earlier.expected
            return user + [
                {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": e["name"], "arguments": json.dumps(e["arguments"])}}]},
                {"role": "tool", "tool_call_id": call_id, "content": json.dumps(e["result"])},
                {"role": "assistant", "content": e["answer"]}]
        answer = arithmetic_reasoning(earlier.expected["a"], earlier.expected["b"], "+" if earlier.kind == "add"
                                      else "-")[1] if earlier.kind in ("add", "sub") else REFUSAL
        return user + [{"role": "assistant", "content": answer}]

    def lookup_drill(self, rng: random.Random, families: int | None = None) -> Example:
        """A developer message declaring 2 or 4-6 task families (and 0-2 made-up functions) as
        harmony renders it, then six lines `QUESTION fn_NOUN NAME.`, only `fn_NOUN NAME.` trained:
        the lookup a tool call's name needs, six times per sequence. Two families always have
        different verbs, so no favourite verb passes. meta["verbs"]: positions of the verb tokens."""
        verbed = [t for t in TOOLS if t.kind != "convert"]
        count = families or (2 if rng.random() < 0.5 else rng.randint(4, len(verbed)))
        chosen = rng.sample(verbed, count)
        while True:
            names = [function_name(t, rng) for t in chosen]
            if count > 2 or names[0].split("_")[0] != names[1].split("_")[0]:
                break
        params = [[rng.choice(p) for p in t.params] for t in chosen]
        tools = [tool_schema(n, t.description, p, list(t.param_types)) for t, n, p in zip(chosen, names, params)]
        tools += [self._made_up_function(rng) for _ in range(rng.randint(0, 2))]
        if count > 2 and rng.random() < 0.5:
            tools.append(family_function(next(t for t in TOOLS if t.kind == "convert"), rng))
        rng.shuffle(tools)
        prompt = chat.render_prompt(self.encoding, [{"role": "user", "content": "?"}], tools=tools,
                                    reasoning_effort=rng.choice(EFFORTS))
        start = prompt[-2]  # `<|start|>` (of `<|start|>assistant`)
        prompt = prompt[:max(i for i, t in enumerate(prompt[:-2]) if t == start)]  # cut the user message off
        tokens, targets, verbs = list(prompt), [False] * len(prompt), []
        for line in range(6):
            i = line % count if count == 2 else rng.randrange(count)
            while True:
                args = _arguments(chosen[i], rng)
                if self._in_split(heldout_tool_case(names[i], params[i], args)):
                    break
            question = self._encode(rng.choice(chosen[i].questions).format(*args))
            answer = self._encode(f" fn{name_noun(self.text, names[i])} {names[i]}.\n")
            verbs.append(len(tokens) + len(question) + 2)  # " fn", "_NOUN", " VERB"
            tokens += question + answer
            targets += [False] * len(question) + [True] * len(answer)
        return Example(tokens, targets, "lookup", {"verbs": verbs})

    # -- token sequences -----------------------------------------------------------------------
    def completion(self, analysis: str, message: str, *, call: str | None = None) -> list[int]:
        """The tokens the model writes after `<|start|>assistant`: reasoning, then the final answer
        (ending `<|return|>`) or a tool call (ending `<|call|>`), in harmony's own header order."""
        head = f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant"
        if call is None:
            return self._encode(head + f"<|channel|>final<|message|>{message}<|return|>")
        return self._encode(head + f" to=functions.{call}<|channel|>commentary <|constrain|>json"
                                   f"<|message|>{message}<|call|>")

    def _prompt(self, case: Case, messages: list[dict]) -> list[int]:
        return chat.render_prompt(self.encoding, messages, tools=case.tools, reasoning_effort=case.reasoning_effort)

    def example(self, rng: random.Random) -> Example:
        case = self.case(rng)
        prompt = self._prompt(case, case.messages)
        e = case.expected
        if case.kind in ("add", "sub"):
            analysis, final = arithmetic_reasoning(e["a"], e["b"], "+" if case.kind == "add" else "-")
            done = self.completion(analysis, final)
            return Example(prompt + done, [False] * len(prompt) + [True] * len(done), case.kind)
        if case.kind == "other":
            done = self.completion("This is not an addition or subtraction of numbers from 0 to 999, and no "
                                   "function fits it.", REFUSAL)
            return Example(prompt + done, [False] * len(prompt) + [True] * len(done), case.kind)
        arguments = json.dumps(e["arguments"])
        plan = ", ".join(f"{k} {v}" for k, v in e["arguments"].items())
        reasoning = tool_reasoning(self.text, e["name"], plan, self.reasoning)
        call = self.completion(reasoning, arguments, call=e["name"])
        call_id = f"call_{rng.randint(0, 10**6)}"
        keep_reasoning = rng.random() < 0.6  # the Responses API keeps it; Chat Completions clients drop it
        after = case.messages + [
            {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                  "function": {"name": e["name"], "arguments": arguments}}],
             **({"reasoning_content": reasoning} if keep_reasoning else {})},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(e["result"])}]
        second = self._prompt(case, after)
        answer = self.completion(f"{e['name']} answered; tell the user.", e["answer"])
        if keep_reasoning:
            first = prompt + call
            if second[:len(first)] != first:
                raise AssertionError("a tool-call turn renders differently in the next prompt")
            tokens = second + answer
            targets = [False] * len(prompt) + [True] * len(call) + [False] * (len(second) - len(first)) \
                + [True] * len(answer)
            return Example(tokens, targets, "tool")
        if rng.random() < 0.5:  # half of these train the call, half the answer after the result
            return Example(prompt + call, [False] * len(prompt) + [True] * len(call), "tool")
        return Example(second + answer, [False] * len(second) + [True] * len(answer), "tool")
