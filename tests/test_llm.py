"""The Python API and the `gptoss chat` / `gptoss generate` commands on a random-weight model."""

import os
import subprocess
import sys

import pytest

from gptoss.llm import LLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """`gptoss synth` output: a tiny model folder with tokenizer.json, as a user would have."""
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    out = subprocess.run([sys.executable, "-m", "gptoss.cli", "synth", str(folder), "--preset", "tiny"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (folder / "tokenizer.json").exists()
    return folder


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir)


def test_chat_streams_deltas_that_add_up_to_the_result(llm):
    stream = llm.chat_stream([{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0)
    deltas = list(stream)
    result = stream.result
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 12 == len(result.token_ids)
    assert result.usage.prompt_tokens > 10
    assert "".join(d.text for d in deltas if d.channel == "final") == result.text
    assert "".join(d.text for d in deltas if d.channel == "analysis") == result.reasoning
    assert all(d.channel in ("analysis", "commentary", "final") for d in deltas)


def test_greedy_and_seeded_sampling_are_reproducible(llm):
    messages = [{"role": "user", "content": "Count"}]
    assert llm.chat(messages, max_tokens=6, temperature=0).token_ids == \
        llm.chat(messages, max_tokens=6, temperature=0).token_ids
    a = llm.chat(messages, max_tokens=6, seed=3)
    b = llm.chat(messages, max_tokens=6, seed=3)
    assert a.token_ids == b.token_ids


def test_generate_raw_text_and_batches(llm):
    one = llm.generate("The capital of France is", max_tokens=5, temperature=0)
    assert one.usage.completion_tokens == 5 and one.text
    batch = llm.generate(["a", "The capital of France is"], max_tokens=5, temperature=0)
    assert batch[1].token_ids == one.token_ids
    assert llm.decode(one.token_ids) == one.text


def test_stop_string_cuts_the_answer(llm):
    full = llm.generate("Once upon a time", max_tokens=10, temperature=0)
    stop = full.text[3:6]
    cut = llm.generate("Once upon a time", max_tokens=10, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_closing_a_stream_aborts_the_request(llm):
    stream = llm.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=50, temperature=0)
    next(iter(stream), None)
    stream.close()
    assert stream.result.finish_reason == "abort"
    assert not llm.engine.has_unfinished()


def test_bad_sampling_values_and_messages_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm.chat([{"role": "user", "content": "Hi"}], temperature=-1)
    with pytest.raises(ValueError, match="unknown"):
        llm.chat([{"role": "user", "content": "Hi"}], temprature=0.5)
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "wizard", "content": "Hi"}])


def _gptoss(args, stdin="", env=None):
    return subprocess.run([sys.executable, "-m", "gptoss.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_chat_command_through_a_pipe(model_dir):
    out = _gptoss(["chat", str(model_dir), "--max-tokens", "8", "--temperature", "0"],
                  stdin="Hello there\n/effort low\nAnd again\n/reset\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(8 tokens,") == 2
    assert "(reasoning effort: low)" in out.stdout
    assert "(conversation cleared)" in out.stdout
    assert "Traceback" not in out.stderr


def test_chat_works_offline_from_the_model_folder(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["GPTOSS_CACHE"] = str(tmp_path / "cache")  # nothing cached yet: tokenizer.json must do
    out = _gptoss(["chat", str(model_dir), "--max-tokens", "4", "--hide-reasoning"], stdin="Hi\n", env=env)
    assert out.returncode == 0, out.stderr
    assert "(4 tokens," in out.stdout


def test_generate_command(model_dir):
    out = _gptoss(["generate", str(model_dir), "--prompt", "Hello", "--max-tokens", "6", "--temperature", "0"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_cli_errors_are_one_line(model_dir, tmp_path):
    out = _gptoss(["chat", str(model_dir), "--temperature", "5"])
    assert out.returncode == 2 and "temperature" in out.stderr and "Traceback" not in out.stderr
    out = _gptoss(["generate", str(tmp_path / "nothing"), "--prompt", "x"])
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
