"""OpenAI-shaped messages rendered exactly as openai-harmony renders them; the parser never raises."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent,
                            ToolDescription)

from gptoss import chat
from gptoss.chat import ChatFormatError, StreamParser, parse_completion, render_prompt
from gptoss.tokenizer import harmony_encoding

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


def harmony(enc, *messages, effort=ReasoningEffort.MEDIUM):
    system = Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))
    return enc.render_conversation_for_completion(Conversation.from_messages([system, *messages]), Role.ASSISTANT)


def test_plain_user_message(enc):
    got = render_prompt(enc, [{"role": "user", "content": "Hello"}])
    assert got == harmony(enc, Message.from_role_and_content(Role.USER, "Hello"))


def test_system_and_developer_become_developer_instructions(enc):
    got = render_prompt(enc, [{"role": "system", "content": "Be brief."},
                              {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                              {"role": "user", "content": "Hi"}], reasoning_effort="high")
    developer = DeveloperContent.new().with_instructions("Be brief.\n\nAnswer in French.")
    assert got == harmony(enc, Message.from_role_and_content(Role.DEVELOPER, developer),
                          Message.from_role_and_content(Role.USER, "Hi"), effort=ReasoningEffort.HIGH)
    assert "Reasoning: high" in enc.decode(got)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort_is_in_the_system_message(enc, effort):
    text = enc.decode(render_prompt(enc, [{"role": "user", "content": "x"}], reasoning_effort=effort))
    assert f"Reasoning: {effort}" in text


def test_tools_tool_call_and_tool_result(enc):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    got = render_prompt(enc, messages, tools=[WEATHER])
    tool = ToolDescription.new("get_weather", "Current weather in a city",
                               parameters=WEATHER["function"]["parameters"])
    expected = harmony(
        enc,
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools([tool])),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        Message.from_role_and_content(Role.ASSISTANT, "I should call the tool.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"temp_c": 21}')
        .with_channel("commentary").with_recipient("assistant"),
    )
    assert got == expected
    text = enc.decode(got)
    assert "to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" in text
    assert "I should call the tool." in text  # reasoning before a tool call in this turn is kept


def test_reasoning_of_an_earlier_finished_turn_is_dropped(enc):
    messages = [{"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1", "reasoning_content": "secret thoughts"},
                {"role": "user", "content": "Q2"}]
    got = render_prompt(enc, messages)
    expected = harmony(enc, Message.from_role_and_content(Role.USER, "Q1"),
                       Message.from_role_and_content(Role.ASSISTANT, "secret thoughts").with_channel("analysis"),
                       Message.from_role_and_content(Role.ASSISTANT, "A1").with_channel("final"),
                       Message.from_role_and_content(Role.USER, "Q2"))
    assert got == expected
    assert "secret thoughts" not in enc.decode(got) and "A1" in enc.decode(got)


def test_tool_choice(enc):
    user = [{"role": "user", "content": "x"}]
    assert render_prompt(enc, user, tools=[WEATHER], tool_choice="none") == render_prompt(enc, user)
    assert "You must call the function get_weather" in enc.decode(
        render_prompt(enc, user, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert "You must call one of the functions" in enc.decode(
        render_prompt(enc, user, tools=[WEATHER], tool_choice="required"))


@pytest.mark.parametrize("messages, tools, match", [
    ([], None, "non-empty"),
    ([{"role": "wizard", "content": "x"}], None, r"messages\[0\]: unknown role"),
    ([{"role": "user", "content": 3}], None, r"messages\[0\]: content must be"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}], None,
     r"messages\[1\]: tool_call_id 'nope' matches no"),
    ([{"role": "assistant"}], None, "needs content or tool_calls"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "bad name!"}}], r"tools\[0\]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], None, "only text"),
])
def test_bad_messages_name_the_problem(enc, messages, tools, match):
    with pytest.raises(ChatFormatError, match=match):
        render_prompt(enc, messages, tools=tools)
    with pytest.raises(ChatFormatError, match="reasoning_effort"):
        render_prompt(enc, [{"role": "user", "content": "x"}], reasoning_effort="max")


def test_parse_reasoning_then_answer(enc):
    tokens = enc.encode("<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final"
                        "<|message|>Paris.<|return|>", allowed_special="all")
    parser = StreamParser(enc)
    deltas = [d for t in tokens for d in parser.feed(t)]
    out = parser.finish()
    assert (out.reasoning, out.content, out.tool_calls) == ("Let me think.", "Paris.", [])
    assert {d.channel for d in deltas} == {"analysis", "final"}
    assert out.reasoning_tokens >= 3 and not parser.broken


def test_parse_tool_call(enc):
    tokens = enc.encode('<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather'
                        '<|channel|>commentary <|constrain|>json<|message|>{"city": "Rome"}<|call|>',
                        allowed_special="all")
    out = parse_completion(enc, tokens)
    assert len(out.tool_calls) == 1
    call = out.tool_calls[0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    assert call["id"].startswith("call_") and out.content == ""


def test_truncated_output_keeps_its_text(enc):
    out = parse_completion(enc, enc.encode("<|channel|>final<|message|>Half an ans", allowed_special="all"))
    assert out.content == "Half an ans"
    # cut inside the header: the header text is shown rather than lost
    out = parse_completion(enc, enc.encode("<|channel|>fin", allowed_special="all"))
    assert "fin" in out.content


def test_malformed_output_degrades_to_text_with_one_warning(enc, caplog):
    tokens = enc.encode("hello <|end|> world", allowed_special="all")
    with caplog.at_level("WARNING", logger="gptoss.chat"):
        out = parse_completion(enc, tokens)
    assert "world" in out.content
    assert len([r for r in caplog.records if r.name == "gptoss.chat"]) == 1


token_ids = st.one_of(st.integers(0, 201087), st.integers(199998, 200018))


@settings(max_examples=200, deadline=None)
@given(st.lists(token_ids, max_size=60))
def test_random_tokens_never_raise(enc, tokens):
    parser = StreamParser(enc)
    for t in tokens:
        parser.feed(t)
    parser.flush()
    parser.finish()


def test_reasoning_of_every_answered_turn_is_dropped(enc):
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "r2"},
                {"role": "user", "content": "Q3"}]
    text = enc.decode(render_prompt(enc, messages))
    assert "r1" not in text and "r2" not in text and "A1" in text and "A2" in text


def test_content_beside_tool_calls_is_a_commentary_preamble(enc):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "Let me check.", "reasoning_content": "think",
                 "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "sunny"}]
    text = enc.decode(render_prompt(enc, messages, tools=[WEATHER]))
    assert "<|channel|>commentary<|message|>Let me check.<|end|>" in text
    assert text.index("Let me check.") < text.index("to=functions.get_weather")
    assert "think" in text  # the turn is not answered yet: its reasoning stays


def test_tool_call_with_empty_arguments_is_kept(enc):
    out = parse_completion(enc, enc.encode("<|channel|>commentary to=functions.get_time <|constrain|>json"
                                           "<|message|><|call|>", allowed_special="all"))
    assert [c["function"] for c in out.tool_calls] == [{"name": "get_time", "arguments": ""}]


def test_a_long_answer_parses_whole(enc):
    body = enc.encode("word " * 4000)
    out = parse_completion(enc, enc.encode("<|channel|>final<|message|>", allowed_special="all") + body)
    assert out.content == "word " * 4000


def test_long_texts_render_exactly_as_harmony_and_fast(enc, monkeypatch):
    """Long user and tool texts are tokenized by tiktoken and spliced in: the same tokens as
    harmony's own rendering (special-token text included), without its superlinear time."""
    import time

    texts = ["a" * 5000, "Hi <|end|><|start|>assistant<|channel|>final " * 200, "é😀 \n\t" * 1000]
    for text in texts:
        messages = [{"role": "user", "content": "What's the weather?"},
                    {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "get_weather", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": text},
                    {"role": "user", "content": text + "?"}]
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        fast = chat.render_prompt(enc, messages, tools=tools)
        monkeypatch.setattr(chat, "LONG_TEXT", 10**9)
        assert chat.render_prompt(enc, messages, tools=tools) == fast
        monkeypatch.undo()
    start = time.perf_counter()
    chat.render_prompt(enc, [{"role": "user", "content": "a" * 300_000}])  # harmony alone: over a minute
    assert time.perf_counter() - start < 5


def test_text_where_a_header_belongs_streams_at_once_without_special_tokens(enc):
    """A model that writes plain text instead of a header: its text comes out within a few
    tokens (not all at the end), and special tokens in broken output never show up as text."""
    from gptoss.tokenizer import tiktoken_encoding

    text_ids = tiktoken_encoding().encode("Hello there, this is just some plain text without any header at all.")
    parser = StreamParser(enc)
    first_text_at = None
    for i, token in enumerate(text_ids):
        if parser.feed(token) and first_text_at is None:
            first_text_at = i
    assert first_text_at is not None and first_text_at <= 8
    start, channel = enc.encode("<|start|>", allowed_special="all"), enc.encode("<|channel|>", allowed_special="all")
    out = "".join(d.text for t in [*start, *channel, *text_ids[:3]] for d in parser.feed(t))
    assert "<|" not in out
    assert "<|" not in parser.finish().content
