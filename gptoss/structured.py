"""Structured outputs: a grammar per request, enforced token by token (llguidance).

A constrained request carries one grammar over everything the model writes. For chat requests
the grammar spells out harmony: the analysis message stays free text (at most
`max_reasoning_tokens` tokens, after which the header of the next message is forced), then comes
the message that must conform: the final answer as JSON (`response_format`), or a call to one of
the given functions with arguments matching its parameters (`tool_choice` "required" or named;
`strict` tools). For raw completions the grammar is the JSON schema, regex or Lark grammar itself.

The engine stays tokenizer-free: `Structurer` turns a request into a `TokenMatcher`, which the
sequence carries; each step the runner asks the constrained rows for their masks and applies them
in the batched sampler. Rows without a matcher pay nothing.

llguidance rather than xgrammar: it computes a mask over the 201k-token o200k vocabulary in
~50-250 us with no per-schema precompilation, understands special tokens inside Lark grammars
(harmony's <|channel|>, <|message|>, ...), bounds a free-text lexeme by a token count (the
reasoning budget), and installs as one small wheel with no dependencies
(benchmarks/structured_outputs.py measures compile and mask times).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

RETURN, CALL = 200002, 200012  # <|return|>, <|call|>
# At most one space where JSON allows whitespace: both the compact spelling gpt-oss writes and
# json.dumps' ", " / ": " (the demo model's) fit, and no output can run on in whitespace.
JSON_OPTIONS = {"whitespace_pattern": " ?"}


class StructuredOutputError(ValueError):
    """A schema, regex or grammar that cannot be enforced; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    """A function the model may be made to call; `parameters` None: any JSON object."""

    name: str
    parameters: dict | None = None


def check_schema(schema, param: str) -> None:
    """A JSON schema must be a valid schema (Draft 2020-12 meta-schema); the error names where."""
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{param} must be a JSON schema object", param)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise StructuredOutputError(f"{param}{where} is not a valid JSON schema: {exc.message}",
                                    f"{param}{where}") from None


# -- steering: what the prompt says (the grammar is what enforces it) ----------------------------------

def json_instructions(kind: str, name: str | None, description: str | None, schema: dict | None) -> str:
    """The gpt-oss way to ask for structured output: a "# Response Formats" section in the
    developer instructions. It steers the model; decoding is not constrained."""
    if kind == "json_object":
        return "# Response Formats\n\nAnswer with a single valid JSON object and nothing else."
    lines = ["# Response Formats", "", f"## {name or 'response'}", ""]
    if description:
        lines.append(f"// {description}")
    lines.append(json.dumps(schema or {}, separators=(",", ":")))
    return "\n".join(lines)


def add_instructions(messages: list[dict], text: str) -> list[dict]:
    """Append text to the developer instructions (the first system/developer message, or a new one)."""
    for i, message in enumerate(messages):
        if message["role"] in ("system", "developer"):
            merged = dict(message, content=f"{message.get('content') or ''}\n\n{text}".strip())
            return messages[:i] + [merged] + messages[i + 1:]
    return [{"role": "developer", "content": text}] + messages


def response_format_instructions(response_format: dict | None) -> str | None:
    """The instructions for an OpenAI-shaped response_format (Chat Completions' nested
    `json_schema` object or the Responses API's flat one)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    spec = response_format.get("json_schema", response_format)
    return json_instructions(kind, spec.get("name"), spec.get("description"), spec.get("schema"))


# -- grammars --------------------------------------------------------------------------------------

def _lark_string(text: str) -> str:
    return json.dumps(text)


def _json_rule(schema: dict | None) -> str:
    body = dict(schema) if schema else {"type": "object"}
    body.setdefault("x-guidance", JSON_OPTIONS)
    return "%json " + json.dumps(body)


def harmony_grammar(*, answer_schema: dict | None = None, answer_json: bool = False,
                    functions: list[Function] = (), must_call: bool = False,
                    max_reasoning_tokens: int | None = None) -> str:
    """A Lark grammar of one assistant turn in harmony after `<|start|>assistant`: an optional
    analysis message, then a final answer (JSON when asked, else free text) or, when functions
    are given, a call to one of them. `must_call` leaves no final answer."""
    # The budget counts what usage reports as reasoning: the analysis text and its <|end|>.
    if max_reasoning_tokens is not None and max_reasoning_tokens <= 1:
        lines = ["start: next"]  # no room for an analysis message
    else:
        budget = f"[max_tokens={int(max_reasoning_tokens) - 1}]" if max_reasoning_tokens is not None else ""
        lines = ["start: (analysis <|start|> \"assistant\")? next",
                 "analysis: <|channel|> \"analysis\" <|message|> thought <|end|>",
                 f"thought{budget}: /(.|\\n)*/"]
    choices = []
    if not must_call:
        answer = _json_rule(answer_schema) if (answer_schema is not None or answer_json) else "/(.|\\n)*/"
        lines += ["final: <|channel|> \"final\" <|message|> answer <|return|>", f"answer: {answer}"]
        choices.append("final")
    for i, function in enumerate(functions):
        to = f" to=functions.{function.name}"
        both_orders = (f"({_lark_string(to)} <|channel|> \"commentary\" | <|channel|> "
                       f"{_lark_string('commentary' + to)})")
        lines += [f"call_{i}: {both_orders} (\" \" <|constrain|> \"json\")? <|message|> args_{i} <|call|>",
                  f"args_{i}: {_json_rule(function.parameters)}"]
        choices.append(f"call_{i}")
    if not choices:
        raise StructuredOutputError("a forced tool call needs at least one function", "tool_choice")
    lines.insert(1, "next: " + " | ".join(choices))
    return "\n".join(lines) + "\n"


class TokenMatcher:
    """One request's place in its grammar: the mask of allowed next tokens, advanced per token."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self._matcher.is_error():
            raise StructuredOutputError(self._matcher.get_error())

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of an int32 [B, V/32] bitmask <- the tokens allowed next."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask, row)

    def advance(self, token_id: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token_id)


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`logits` with every token a constrained row's bitmask forbids set to -inf, in place (other
    rows untouched). The masking itself is llguidance's kernel (8x a torch bit expansion)."""
    from llguidance.torch import apply_token_bitmask_inplace

    batch, vocab = logits.shape
    bits = bitmask if len(rows) == batch else bitmask[rows]
    stuck = bits.eq(0).all(dim=1)  # a matcher in error allows nothing: let the row end
    if stuck.any() and RETURN < 32 * bits.shape[1]:
        bits = bits.clone()
        bits[stuck, RETURN // 32] |= 1 << (RETURN % 32)
    bits = bits[:, : (vocab + 31) // 32].to(logits.device)
    if len(rows) == batch:
        apply_token_bitmask_inplace(logits, bits)
        return logits
    index = torch.tensor(rows, device=logits.device)
    picked = logits.index_select(0, index)
    apply_token_bitmask_inplace(picked, bits)
    return logits.index_copy_(0, index, picked)


def new_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


class Structurer:
    """Turns what a request asks for into a checked grammar and a TokenMatcher (tokenizer-bound)."""

    def __init__(self, text_encoding, vocab_size: int):
        self.text_encoding, self.vocab_size = text_encoding, vocab_size

    @functools.cached_property
    def tokenizer(self):
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(self.text_encoding, n_vocab=self.vocab_size, eos_token=RETURN)

    def text_grammar(self, *, json_schema=None, regex: str | None = None, grammar: str | None = None,
                     json_object: bool = False, names: dict[str, str] | None = None) -> str | None:
        """The grammar of a raw completion; None when nothing constrains it. `names` maps each
        option to the request field it came from (for error messages)."""
        import llguidance

        names = {"json_schema": "json_schema", "regex": "regex", "grammar": "grammar", **(names or {})}
        given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
        if len(given) + bool(json_object) > 1:
            raise StructuredOutputError(f"give one of {', '.join(names[k] for k in given)}", names[given[-1]])
        if json_schema is not None:
            if isinstance(json_schema, str):
                try:
                    json_schema = json.loads(json_schema)
                except json.JSONDecodeError as exc:
                    raise StructuredOutputError(f"{names['json_schema']} is not valid JSON: {exc}",
                                                names["json_schema"]) from None
            check_schema(json_schema, names["json_schema"])
            return self.checked(llguidance.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS),
                                names["json_schema"])
        if json_object:
            return self.checked(llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                              defaults=JSON_OPTIONS), "response_format")
        if regex is not None:
            return self.checked(llguidance.LLMatcher.grammar_from_regex(regex), names["regex"])
        if grammar is not None:
            return self.checked(llguidance.LLMatcher.grammar_from_lark(grammar), names["grammar"])
        return None

    def chat_request_grammar(self, *, tools: list[dict] | None = None, tool_choice=None,
                             response_format: dict | None = None, max_reasoning_tokens: int | None = None,
                             param: str = "response_format") -> str | None:
        """chat_grammar for OpenAI-shaped fields: tools (Chat Completions' nested or the Responses
        API's flat functions), tool_choice ("auto", "none", "required" or a named function) and
        response_format (either API's shape)."""
        specs = [t.get("function", t) for t in tools or []]
        named = tool_choice.get("function", tool_choice).get("name") if isinstance(tool_choice, dict) else None
        forced = named is not None or tool_choice == "required"
        functions = [Function(f["name"], (f.get("parameters") or {"type": "object"}) if forced or f.get("strict")
                              else None) for f in specs if named is None or f["name"] == named]
        fmt = dict(response_format or {})
        if fmt.get("type") == "json_schema":
            fmt["schema"] = fmt.get("json_schema", fmt).get("schema")
        return self.chat_grammar(response_format=fmt, functions=functions,
                                 tool_choice="function" if named else tool_choice,
                                 max_reasoning_tokens=max_reasoning_tokens, param=param)

    def chat_grammar(self, *, response_format: dict | None = None, functions: list[Function] = (),
                     tool_choice: str | None = None, max_reasoning_tokens: int | None = None,
                     param: str = "response_format") -> str | None:
        """The harmony grammar of a chat turn, or None when the request constrains nothing.
        `tool_choice` "required" or "function" forces a call to one of `functions` (narrowed to the
        named one by the caller), "none" forbids calls. A function's `parameters` constrain its
        arguments: give them for strict functions, and for all when a call is forced."""
        kind = (response_format or {}).get("type", "text")
        schema = None
        if kind == "json_schema":
            schema = response_format.get("schema")
            check_schema(schema, f"{param}.schema")
        forced = tool_choice in ("required", "function")
        offered = [] if tool_choice == "none" else list(functions)
        if (kind == "text" and not forced and max_reasoning_tokens is None and tool_choice != "none"
                and not any(f.parameters is not None for f in offered)):
            return None
        if max_reasoning_tokens is not None and (not isinstance(max_reasoning_tokens, int) or max_reasoning_tokens < 0):
            raise StructuredOutputError("max_reasoning_tokens must be an integer >= 0", "max_reasoning_tokens")
        grammar = harmony_grammar(answer_schema=schema, answer_json=kind == "json_object", functions=offered,
                                  must_call=forced, max_reasoning_tokens=max_reasoning_tokens)
        import llguidance

        return self.checked(llguidance.LLMatcher.grammar_from_lark(grammar), param)

    def checked(self, grammar: str, param: str) -> str:
        error = _validate(self, grammar)
        if error:
            raise StructuredOutputError(f"{param} cannot be enforced: {error}", param)
        return grammar

    def matcher(self, grammar: str | None) -> TokenMatcher | None:
        return None if grammar is None else TokenMatcher(self.tokenizer, grammar)


@functools.lru_cache(maxsize=256)
def _validate(structurer: Structurer, grammar: str) -> str:
    """llguidance's verdict on a grammar ("" when valid), cached by its text: a schema sent again
    costs nothing."""
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar, structurer.tokenizer)
