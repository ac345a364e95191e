"""OpenAI-shaped chat messages <-> harmony tokens.

Rendering builds the harmony Conversation that openai-harmony renders (system message with the
reasoning effort, developer message with instructions and function tools, then the turns), so
the prompt is exactly what the model was trained on. Parsing follows the model's output token by
token and never raises: when the output stops being valid harmony (a random-weight model does
this all the time), the rest is passed on as plain text on the channel it was in.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field

from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role,
                            StreamableParser, SystemContent, ToolDescription)

from gptoss.tokenizer import MESSAGE, STARTOFTEXT

log = logging.getLogger("gptoss.chat")

EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
TOOL_PREFIX = "functions."
# A real header ("<|channel|>commentary to=functions.NAME <|constrain|>json") is about ten tokens;
# one that runs on this long is not a header, and its tokens are shown as text.
MAX_HEADER_TOKENS = 24
# A header holds a role, a channel, a recipient and a content type: a few words on one line.
# Anything longer is text where a header belongs, passed on as it comes instead of held back.
MAX_HEADER_WORDS = 6
FIRST_SPECIAL = STARTOFTEXT  # every special token id is at least this


class ChatFormatError(ValueError):
    """A message list that cannot be rendered; the message names the index and the problem."""


# -- rendering ----------------------------------------------------------------------------------

def _text(content, where: str) -> str:
    """OpenAI content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ChatFormatError(f"{where}: only text content parts are supported, got {part!r:.80}")
        return "".join(parts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_descriptions(tools: list[dict]) -> list[ToolDescription]:
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ChatFormatError(f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ChatFormatError(f"tools[{i}]: function name {name!r} must be letters, digits, '_' or '-'")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ChatFormatError(f"tools[{i}]: parameters must be a JSON schema object")
        out.append(ToolDescription.new(name, fn.get("description") or "", parameters=parameters))
    return out


def _tool_choice_instruction(tool_choice, tools: list[ToolDescription]) -> str | None:
    """harmony cannot force a call; "required" or a named function becomes an instruction."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return "You must call one of the functions before answering."
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in {t.name for t in tools}:
            raise ChatFormatError(f"tool_choice names the function {name!r}, which is not in tools")
        return f"You must call the function {name}."
    raise ChatFormatError(f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}")


def build_conversation(messages: list[dict], *, tools: list[dict] | None = None,
                       reasoning_effort: str = "medium", tool_choice=None) -> Conversation:
    if reasoning_effort not in EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be one of low, medium, high; got {reasoning_effort!r}")
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    system = SystemContent.new().with_reasoning_effort(EFFORTS[reasoning_effort])
    conversation = [Message.from_role_and_content(Role.SYSTEM, system)]

    functions = _tool_descriptions(tools or []) if tool_choice != "none" else []
    instructions = []
    turns: list[Message] = []
    call_names: dict[str, str] = {}
    # harmony 0.0.8 drops only the reasoning before the first answer; drop every answered turn's.
    last_answer = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"
                       and m.get("content") and not m.get("tool_calls")), default=-1)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where}: a message must be an object with a role")
        role = m.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(m.get("content"), where))
        elif role == "user":
            turns.append(Message.from_role_and_content(Role.USER, _text(m.get("content"), where)))
        elif role == "assistant":
            turns += _assistant_turn(m, where, call_names, answered_later=i <= last_answer)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            name = call_names.get(call_id) or m.get("name")
            if not name:
                raise ChatFormatError(f"{where}: tool_call_id {call_id!r} matches no earlier assistant tool call")
            author = Author.new(Role.TOOL, TOOL_PREFIX + name)
            turns.append(Message.from_author_and_content(author, _text(m.get("content"), where))
                         .with_channel("commentary").with_recipient("assistant"))
        else:
            raise ChatFormatError(f"{where}: unknown role {role!r}; use system, developer, user, assistant or tool")

    forced = _tool_choice_instruction(tool_choice, functions)
    if forced:
        instructions.append(forced)
    if instructions or functions:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if functions:
            developer = developer.with_function_tools(functions)
        conversation.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(conversation + turns)


def _assistant_turn(m: dict, where: str, call_names: dict[str, str], answered_later: bool) -> list[Message]:
    """`answered_later`: a final answer follows (in this message or a later one), so the turn's
    reasoning is finished and is dropped, as harmony specifies for completed turns."""
    out = []
    reasoning = m.get("reasoning_content") or m.get("reasoning")
    if reasoning and not answered_later:
        out.append(Message.from_role_and_content(Role.ASSISTANT, _text(reasoning, where)).with_channel("analysis"))
    content = m.get("content")
    calls = m.get("tool_calls") or []
    if content and calls:  # text beside tool calls is a preamble on commentary, said before the calls
        out.append(Message.from_role_and_content(Role.ASSISTANT, _text(content, where)).with_channel("commentary"))
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"{where}.tool_calls[{j}]: expected {{'function': {{'name', 'arguments'}}}}")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        call_names[call.get("id", "")] = fn["name"]
        out.append(Message.from_role_and_content(Role.ASSISTANT, arguments).with_channel("commentary")
                   .with_recipient(TOOL_PREFIX + fn["name"]).with_content_type("<|constrain|>json"))
    if content and not calls:
        out.append(Message.from_role_and_content(Role.ASSISTANT, _text(content, where)).with_channel("final"))
    if not out:
        raise ChatFormatError(f"{where}: an assistant message needs content or tool_calls")
    return out


# User and tool texts longer than this are tokenized by tiktoken and spliced into harmony's
# rendering: harmony's own tokenizer takes time superlinear in the length of a run of one
# character (2 s for 50 KB of "a", over a minute for 300 KB) and holds the GIL meanwhile.
LONG_TEXT = 2048


def render_prompt(encoding, messages: list[dict], *, tools: list[dict] | None = None,
                  reasoning_effort: str = "medium", tool_choice=None) -> list[int]:
    """Prompt tokens for the next assistant turn; earlier reasoning is dropped as harmony does."""
    messages, long_texts = _set_aside_long_texts(messages)
    conversation = build_conversation(messages, tools=tools, reasoning_effort=reasoning_effort,
                                      tool_choice=tool_choice)
    try:
        tokens = encoding.render_conversation_for_completion(conversation, Role.ASSISTANT)
    except BaseException as exc:  # openai-harmony panics (a BaseException) on some huge inputs
        if type(exc).__name__ != "PanicException":
            raise
        raise ChatFormatError("messages: the conversation could not be rendered (openai-harmony failed on it; "
                              "is some text extremely long?)") from None
    return _splice_long_texts(encoding, tokens, long_texts) if long_texts else tokens


def _marker(i: int) -> str:
    return f"@@gptoss-long-text-{i}@@"


def _set_aside_long_texts(messages: list) -> tuple[list, list[str]]:
    """Long user and tool texts replaced by markers (a user or tool message's text is rendered
    alone between <|message|> and <|end|>, so tokenizing it apart gives the same tokens)."""
    out, texts = [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and len(content) > LONG_TEXT and m.get("role") in ("user", "tool"):
            m = {**m, "content": _marker(len(texts))}
            texts.append(content)
        out.append(m)
    return out, texts


def _splice_long_texts(encoding, tokens: list[int], texts: list[str]) -> list[int]:
    from gptoss.tokenizer import END, MESSAGE, text_encoding_for

    text_encoding = text_encoding_for(encoding)
    for i, text in enumerate(texts):
        marker = [MESSAGE, *text_encoding.encode_ordinary(_marker(i)), END]
        at = next(j for j in range(len(tokens) - len(marker) + 1) if tokens[j:j + len(marker)] == marker)
        tokens = tokens[:at + 1] + text_encoding.encode_ordinary(text) + tokens[at + len(marker) - 1:]
    return tokens


# -- parsing ------------------------------------------------------------------------------------

@dataclass
class Delta:
    """A piece of output text. channel: 'analysis' (reasoning), 'commentary', 'final', or None for
    a raw completion; recipient is set for tool-call argument text (e.g. 'functions.get_weather').
    The generation layer adds the token ids and logprobs that produced it."""

    text: str
    channel: str | None = None
    recipient: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob of those tokens


@dataclass
class OutputMessage:
    """The text of one output message, as far as it got."""

    channel: str | None
    recipient: str | None
    text: str = ""


@dataclass
class ParsedOutput:
    reasoning: str
    content: str
    tool_calls: list[dict]
    reasoning_tokens: int
    messages: list[dict] = field(default_factory=list)  # {"channel", "recipient", "text"} per message


class StreamParser:
    """Incremental harmony parser for one assistant turn that degrades instead of raising."""

    def __init__(self, encoding):
        self.encoding = encoding
        self._parser = StreamableParser(encoding, Role.ASSISTANT, strict=False)
        self.broken = False
        self.segments: list[OutputMessage] = []
        self.reasoning_tokens = 0
        self._header: list[int] = []  # tokens of a header not yet closed by <|message|>
        self.last_was_content = False
        # Reading the parser's state costs time proportional to the output so far, and only special
        # tokens change it: read it after those alone, so a long answer stays linear.
        self._state = self._parser.state.name

    def feed(self, token: int) -> list[Delta]:
        """The text this token adds. `last_was_content` then says whether the token belongs to a
        message's content (not a header or a special token), i.e. whether its logprob is shown."""
        self.last_was_content = token < FIRST_SPECIAL and (self.broken or self._state == "CONTENT")
        if self.broken:
            return self._plain_delta(token)
        try:
            self._parser.process(token)
        except Exception as exc:  # the Rust parser raises on anything off-format
            self.last_was_content = False
            return self._break(f"{exc}", [token])
        if token >= FIRST_SPECIAL:
            self._state = self._parser.state.name
            if token == MESSAGE and self._state == "CONTENT":
                # A message starts: a tool call with empty arguments still gets its segment.
                self.segments.append(OutputMessage(self._parser.current_channel, self._parser.current_recipient))
            if self._state != "HEADER":
                self._header.clear()
        if self._state == "HEADER":
            self._header.append(token)
            if len(self._header) > MAX_HEADER_TOKENS:
                return self._break("a message header that never ends", [])
            if token < FIRST_SPECIAL and not self._plausible_header():
                return self._break("text where a message header belongs", [])
            return []
        if self._state != "CONTENT" or not self.segments:
            return []
        segment = self.segments[-1]
        if segment.channel == "analysis":
            self.reasoning_tokens += 1
        text = self._parser.last_content_delta or ""
        if not text:
            return []
        segment.text += text
        return [Delta(text, segment.channel, segment.recipient)]

    def _plausible_header(self) -> bool:
        text = self.encoding.decode([t for t in self._header if t < FIRST_SPECIAL])
        return "\n" not in text and len(text.split()) <= MAX_HEADER_WORDS

    def flush(self) -> list[Delta]:
        """At the end of output: a header cut off by max_tokens is shown as text, not lost."""
        return self._break("output ended inside a message header", []) if self._header and not self.broken else []

    def _break(self, why: str, tokens: list[int]) -> list[Delta]:
        self.broken = True
        log.warning("model output is not valid harmony (%s); passing the rest on as plain text", why)
        pending, self._header = self._header + tokens, []
        return [d for t in pending for d in self._plain_delta(t)]

    def _plain_delta(self, token: int) -> list[Delta]:
        if token >= FIRST_SPECIAL:  # structure the model got wrong: never shown as text
            return []
        try:
            text = self.encoding.decode([token])
        except Exception:
            return []
        last = self.segments[-1] if self.segments else None
        channel = (last.channel if last else None) or "final"
        recipient = last.recipient if last else None
        if channel == "analysis":
            self.reasoning_tokens += 1
        if last is None or (last.channel or "final") != channel:
            self.segments.append(OutputMessage(channel, recipient))
        self.segments[-1].text += text
        return [Delta(text, channel, recipient)]

    def finish(self) -> ParsedOutput:
        reasoning = "".join(s.text for s in self.segments if s.channel == "analysis")
        content = "".join(s.text for s in self.segments if s.channel in ("final", None) and not s.recipient)
        tool_calls = [
            {"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": s.recipient[len(TOOL_PREFIX):], "arguments": s.text}}
            for s in self.segments if s.recipient and s.recipient.startswith(TOOL_PREFIX)
        ]
        messages = [{"channel": s.channel, "recipient": s.recipient, "text": s.text} for s in self.segments]
        return ParsedOutput(reasoning, content, tool_calls, self.reasoning_tokens, messages)


def parse_completion(encoding, tokens: list[int]) -> ParsedOutput:
    parser = StreamParser(encoding)
    for token in tokens:
        parser.feed(token)
    parser.flush()
    return parser.finish()
