"""The demo model that ships with gptoss: its data, its training script, and what it can do.

The quality figures are measured here on held-out cases through `gptoss.LLM`. ISSUE_BAR is what
the project asked for; SHIPPED is what the shipped model measured (python -m gptoss.demo.evaluate).
The tests hold the model to the lower of the two, so a worse model cannot ship unnoticed; where
SHIPPED is below the bar, the bar is not met yet (the README's card says so).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from gptoss.demo import NAME, demo_model_path
from gptoss.demo.data import REFUSAL, ConversationGenerator, arithmetic_reasoning, heldout_problem


@pytest.fixture(scope="module")
def encodings():
    from gptoss.tokenizer import harmony_encoding, tiktoken_encoding

    return harmony_encoding(), tiktoken_encoding()


# -- the data ------------------------------------------------------------------------------------

def test_arithmetic_reasoning_is_right_for_every_kind_of_problem():
    rng = random.Random(0)
    for _ in range(2000):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-")
        analysis, final = arithmetic_reasoning(a, b, op)
        value = a + b if op == "+" else a - b
        assert final == f"{a} {op} {b} = {value}."
        digits = [line for line in analysis.splitlines() if line.startswith("digits ")][0]
        assert int("".join(digits.split()[1:])) == abs(value)


def test_training_examples_render_as_harmony_and_keep_the_evaluation_set_out(encodings):
    from openai_harmony import Role

    encoding, text = encodings
    generator = ConversationGenerator(encoding, text, "train")
    rng = random.Random(1)
    kinds = set()
    for _ in range(400):
        example = generator.example(rng)  # raises if a tool call renders differently in the next prompt
        kinds.add(example.kind)
        assert len(example.tokens) == len(example.targets) and any(example.targets)
        # The trained part after the last prompt is a well-formed assistant turn.
        last_prompt_end = max(i for i, t in enumerate(example.targets) if not t) + 1
        messages = encoding.parse_messages_from_completion_tokens(example.tokens[last_prompt_end:], Role.ASSISTANT,
                                                                  strict=True)
        assert messages[-1].channel in ("final", "commentary")
        decoded = text.decode(example.tokens)
        if example.kind in ("add", "sub"):
            user = decoded.split("<|start|>user<|message|>")[-1].split("<|end|>")[0]
            numbers = [int(n) for n in __import__("re").findall(r"\d+", user)]
            a, b = numbers[0], numbers[1]
            op = "+" if example.kind == "add" else "-"
            if user.startswith(("Subtract", "Take")):
                a, b = b, a
            assert not heldout_problem(a, b, op)
    assert kinds == {"add", "sub", "tool", "other"}


def test_evaluation_cases_are_held_out(encodings):
    generator = ConversationGenerator(*encodings, "eval")
    rng = random.Random(2)
    for _ in range(200):
        case = generator.arithmetic_case(rng)
        assert heldout_problem(case.expected["a"], case.expected["b"], "+" if case.kind == "add" else "-")


def test_tool_choice_probe_declares_two_real_lookups_with_different_verbs(encodings):
    """scripts/tool_choice_probe.py: a model that ignores the question scores 50% on these cases."""
    import importlib.util
    from pathlib import Path

    from gptoss.demo.data import heldout_tool_case

    path = Path(__file__).parent.parent / "scripts" / "tool_choice_probe.py"
    spec = importlib.util.spec_from_file_location("tool_choice_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    lookups = {t.description: t.kind for t in probe.LOOKUPS}
    cases = probe.two_function_cases(ConversationGenerator(*encodings, "eval"), 200, random.Random(11))
    first_is_target = 0
    for case in cases:
        names = [t["function"]["name"] for t in case.tools]
        kinds = {lookups[t["function"]["description"]] for t in case.tools}
        assert case.expected["name"] in names and len(kinds) == 2 and case.expected["tool"] in kinds
        assert len({probe.verb(n) for n in names}) == 2
        assert heldout_tool_case(case.expected["name"], list(case.expected["arguments"]),
                                 list(case.expected["arguments"].values()))
        first_is_target += names[0] == case.expected["name"]
    assert 70 <= first_is_target <= 130  # the target's place says nothing either


def test_tool_reasoning_writes_the_names_noun_token_then_the_name(encodings):
    """`fn_city check_city_population ...`: the token after "fn" is the declaration's own noun token,
    so the verb is the token before it in the namespace (what an induction head copies)."""
    import itertools

    from gptoss.demo.data import LOOKUP_VERBS, TIMER_VERBS, TOOLS, tool_reasoning

    _, text = encodings
    for tool in TOOLS:
        verbs = TIMER_VERBS if tool.kind == "timer" else LOOKUP_VERBS if tool.kind != "convert" else ("",)
        for verb, noun in itertools.product(verbs, tool.names):
            name = f"{verb}_{noun}" if verb else noun
            reasoning = text.encode(tool_reasoning(text, name, "location Paris", "noun"))
            declared = text.encode(f"type {name} = (_: {{")
            if not verb:
                assert text.decode(reasoning).startswith(f"Call {name} with location Paris")
                continue
            assert text.decode(reasoning[:1]) == "fn" and reasoning[1] == declared[2], name
            assert reasoning[2:2 + len(declared) - 5] == declared[1:-4], name  # then the whole name
    noun_first = ConversationGenerator(*encodings, "train", reasoning="noun")
    rng = random.Random(3)
    tools = [e for e in (noun_first.example(rng) for _ in range(60)) if e.kind == "tool"]
    assert any("<|message|>fn_" in text.decode(e.tokens) for e in tools)
    assert not any("<|message|>fn_" in text.decode(e.tokens)  # the default, as the shipped model was trained
                   for e in (ConversationGenerator(*encodings, "train").example(rng) for _ in range(60)))


def test_lookup_drills_follow_the_developer_message_and_train_only_the_answers(encodings):
    encoding, text = encodings
    for split in ("train", "eval"):
        generator = ConversationGenerator(encoding, text, split)
        rng = random.Random(4)
        for i in range(60):
            drill = generator.lookup_drill(rng, families=2 if i % 2 else None)
            decoded = text.decode(drill.tokens)
            head, lines = decoded.split("} // namespace functions<|end|>")
            # the prefix is harmony's own system + developer message, as a conversation renders them
            assert head.startswith("<|start|>system<|message|>") and "<|start|>developer<|message|>" in head
            lines = lines.splitlines()
            assert len(lines) == 6
            verbs = [text.decode([drill.tokens[v]]).strip() for v in drill.meta["verbs"]]
            for line, verb in zip(lines, verbs):
                question, answer = line.split(" fn_")
                name = answer.split(" ")[1].rstrip(".")
                assert name.startswith(verb + "_") and f"type {name} = " in head
            trained = text.decode([t for t, on in zip(drill.tokens, drill.targets) if on])
            assert trained == "".join(" fn_" + line.split(" fn_")[1] + "\n" for line in lines)
            if i % 2:
                assert len(set(verbs)) == 2  # two families, two verbs: a favourite verb scores half


# -- the training script (a few steps; the real run is ~105 minutes) -------------------------------

@pytest.fixture(scope="module")
def small_run(encodings):
    from pathlib import Path

    from gptoss.demo import train

    generator = ConversationGenerator(*encodings, "train")
    config = train.TrainConfig(out=Path("unused"), batch_size=4)
    vocab = train.CompactVocab(train.used_token_ids(generator, config.seed, 200), train.DEMO_CONFIG.vocab_size)
    return train, generator, config, vocab


def test_batches_render_each_pool_once_and_depend_only_on_the_step(small_run):
    import torch

    train, generator, config, vocab = small_run
    in_order = train.Batches(generator, config, vocab)
    steps = [0, 1, train.POOL - 1, train.POOL, 3 * train.POOL + 2]
    first = {step: in_order[step] for step in steps}
    for step in reversed(steps):  # a fresh source, another order (as after a resume): the same batches
        again = train.Batches(generator, config, vocab)[step]
        assert all(torch.equal(a, b) for a, b in zip(first[step], again)), step
    assert first[0][0].shape != first[1][0].shape or not torch.equal(first[0][0], first[1][0])  # steps differ


def test_copy_stage_batches_repeat_a_few_ids_and_train_only_the_repeats(small_run):
    import torch

    train, generator, config, vocab = small_run
    batches = train.Batches(generator, config, vocab)
    copy_rows = set(vocab.row_of[torch.tensor(batches.copy_from)].tolist())
    assert len(copy_rows) == train.COPY_IDS
    for step in range(3):
        inputs, targets, mask = batches.copy(step)
        assert torch.equal(inputs, train.Batches(generator, config, vocab).copy(step)[0])  # the step decides
        for row in range(len(inputs)):
            used = set(inputs[row].tolist()) - {0}
            assert used <= copy_rows
            n = int((inputs[row] > 0).sum()) + 1  # tokens in the sequence (two copies of one run)
            assert n % 2 == 0 and int(mask[row].sum()) == n // 2  # the repeat is trained, the run is not
    drills = batches.drills(3)  # the drill stage: lookups only, the answers trained
    assert 0 < int(drills[2].sum()) < int((drills[0] > 0).sum()) / 4


def test_the_compiled_training_step_matches_the_plain_one(small_run):
    import torch

    from gptoss import ops

    train, generator, config, vocab = small_run
    ops.use("reference")
    try:
        inputs, targets, mask = train.Batches(generator, config, vocab)[5]
        results = []
        for step_loss in (train.loss_fn, train.compiled_loss(config)):
            model = train.new_model(vocab, seed=3)
            loss, right = step_loss(model, vocab, inputs, targets, mask)
            loss.backward()
            results.append((loss.detach(), right, {n: p.grad for n, p in model.named_parameters()}))
    finally:
        ops.use(None)
    (plain, plain_right, plain_grads), (compiled, compiled_right, compiled_grads) = results
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(compiled_right, plain_right)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_failed_compile_trains_on_uncompiled_with_one_line(small_run, monkeypatch, capsys):
    import torch

    train, generator, config, vocab = small_run

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    step_loss = train.compiled_loss(config)
    inputs, targets, mask = train.Batches(generator, config, vocab)[0]
    model = train.new_model(vocab, seed=3)
    loss, _ = step_loss(model, vocab, inputs, targets, mask)
    torch.testing.assert_close(loss, train.loss_fn(model, vocab, inputs, targets, mask)[0])
    step_loss(model, vocab, inputs, targets, mask)
    printed = capsys.readouterr().out
    assert printed.count("torch.compile failed") == 1 and "No working C++ compiler" in printed
    assert "--no-compile" in printed



def test_training_starts_from_an_exported_folder_exactly(small_run, tmp_path):
    """--init-from: the training model loaded from an MXFP4 or float folder computes what the folder runs."""
    import torch

    from gptoss import Model, ops
    from gptoss.quantize import quantize_checkpoint

    train, generator, config, vocab = small_run
    trained = train.new_model(vocab, seed=3)
    train.export_float(trained, vocab, tmp_path / "float", dtype=torch.float32)
    quantize_checkpoint(tmp_path / "float", tmp_path / "mxfp4", progress=False)
    wider = train.CompactVocab(sorted(set(vocab.ids.tolist()) | {7, 8}), train.DEMO_CONFIG.vocab_size)
    ids = torch.tensor([generator.example(random.Random(1)).tokens[:40]])
    for folder in (tmp_path / "mxfp4", tmp_path / "float"):
        start = train.load_start(folder)
        assert train.trained_token_ids(start) == vocab.ids.tolist()
        model = train.new_model(wider, seed=4)
        train.load_trained(model, wider, start)
        assert model.embedding.weight[wider.row_of[torch.tensor([7, 8])]].abs().sum() == 0  # untrained ids: zero
        ops.use("reference")
        try:
            want = Model.from_pretrained(folder, dtype=torch.float32)(ids)[0][:, wider.ids]
            got = model.lm_head(model.norm(model.hidden_states(wider.row_of[ids])))[0, :, 1:]
        finally:
            ops.use(None)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=folder.name)


def test_init_from_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    from gptoss.demo import train

    with pytest.raises(SystemExit):
        train.main([str(tmp_path / "out"), "--init-from", str(tmp_path)])
    assert "no config.json there" in capsys.readouterr().err


def test_training_runs_checkpoints_resumes_and_exports(tmp_path):
    from gptoss import Model

    out = tmp_path / "run"
    # --copy-until 0: the copy stage ends as soon as its accuracy window is full (COPY_WINDOW steps)
    common = [sys.executable, "-m", "gptoss.demo.train", str(out), "--batch-size", "4", "--vocab-examples", "200",
              "--log-every", "1", "--probe-every", "1000", "--no-eval", "--threads", "1", "--no-compile",
              "--copy-until", "0", "--max-copy-steps", "100", "--drill-steps", "1", "--lookup-share", "0.1",
              "--reasoning", "noun"]
    first = subprocess.run(common + ["--steps", "1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "copy stage done at step 25" in first.stdout
    assert "step    27" in first.stdout and (out / "train_state.pt").exists()
    second = subprocess.run(common + ["--steps", "2"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "resuming from step 27" in second.stdout and "step    28" in second.stdout
    assert "copy stage done" not in second.stdout
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2
    assert info["copy_steps"] == 25 and info["reasoning"] == "noun" and info["lookup_share"] == 0.1
    config = json.loads((out / "mxfp4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert "quantization_config" not in json.loads((out / "float" / "config.json").read_text())
    model = Model.from_pretrained(out / "mxfp4")
    assert model.blocks[0].mlp.experts.gate_up_blocks.dtype.itemsize == 1
    assert (out / "mxfp4" / "tokenizer.json").exists()


# -- the shipped model ---------------------------------------------------------------------------

def test_the_demo_model_ships_and_unpacks_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    folder = demo_model_path()
    assert folder.name == NAME and str(folder).startswith(str(tmp_path))
    for name in ("config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json"):
        assert (folder / name).exists(), name
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert demo_model_path() == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"


ISSUE_BAR = {"arithmetic": 0.95, "arithmetic_t1": 0.90, "second_turn": 0.95, "tool_call": 0.95, "tool_answer": 0.95,
             "other": 0.95, "well_formed": 1.0}
SHIPPED = {"arithmetic": 0.965, "arithmetic_t1": 0.965, "second_turn": 0.99, "tool_call": 0.98, "tool_answer": 0.99,
           "other": 1.0, "well_formed": 1.0}


def floor(skill: str) -> float:
    return min(ISSUE_BAR[skill], SHIPPED[skill])


@pytest.fixture(scope="module")
def demo_llm():
    from gptoss import LLM

    return LLM()  # no path: the demo model


@pytest.fixture(scope="module")
def report(demo_llm):
    from gptoss.demo.evaluate import evaluate, format_report

    result = evaluate(llm=demo_llm)
    print("\n" + format_report({"demo (MXFP4)": result}))
    return result


def test_arithmetic_on_held_out_problems(report):
    assert report["counts"]["arithmetic"] == 200
    assert report["arithmetic"] >= floor("arithmetic")
    assert report["arithmetic_t1"] >= floor("arithmetic_t1")


def test_second_question_is_answered_as_well_as_the_first(report):
    assert report["second_turn"] >= floor("second_turn")


def test_tool_calls_and_answers_from_tool_results(report):
    assert report["counts"]["tools"] == 100
    assert report["tool_call"] >= floor("tool_call")
    assert report["tool_answer"] >= floor("tool_answer")


def test_anything_else_gets_the_fixed_sentence(report):
    assert report["other"] >= floor("other")


def test_every_output_is_well_formed_harmony(report):
    assert report["well_formed"] >= floor("well_formed")


def test_never_seen_tokens_get_almost_no_probability(report):
    assert report["unused_mass_mean"] < 0.01


def test_llm_defaults_to_the_demo_model(demo_llm):
    result = demo_llm.chat([{"role": "user", "content": "What is 482 + 391?"}], temperature=0)
    assert demo_llm.path.name == NAME
    assert "873" in result.text and "482" in result.reasoning and result.finish_reason == "stop"
    other = demo_llm.chat([{"role": "user", "content": "Write me a sonnet about the sea."}], temperature=0)
    assert other.text == REFUSAL


def test_chat_command_with_no_model_answers_with_reasoning():
    done = subprocess.run([sys.executable, "-m", "gptoss.cli", "chat", "--temperature", "0"],
                          input="What is 482 + 391?\n", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "873" in done.stdout
    assert "4 8 2" in done.stdout  # the reasoning is shown (the operand spelled digit by digit)


# -- structured outputs on a trained model (gptoss.structured) ------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
          "additionalProperties": False}


def test_response_format_constrains_the_final_message_and_leaves_reasoning_free(demo_llm):
    import jsonschema

    result = demo_llm.chat([{"role": "user", "content": "What is 482 + 391?"}], temperature=0, max_tokens=300,
                           response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
    jsonschema.validate(json.loads(result.text), ANSWER)
    assert "4 8 2" in result.reasoning  # the model's own worked steps, unconstrained
    assert result.finish_reason == "stop"


def test_forced_and_forbidden_tool_calls_on_the_demo_model(demo_llm):
    weather = [{"role": "user", "content": "What's the weather in Lisbon?"}]
    # the model would call on its own; "required" keeps that call, with the arguments it chose
    required = demo_llm.chat(weather, tools=[WEATHER], tool_choice="required", temperature=0)
    assert required.finish_reason == "tool_calls"
    assert required.tool_calls[0]["function"]["name"] == "get_weather"
    assert json.loads(required.tool_calls[0]["function"]["arguments"]) == {"location": "Lisbon"}
    # a question it would answer itself, with a named function forced: a well-formed call anyway
    forced = demo_llm.chat([{"role": "user", "content": "What is 12 + 30?"}], tools=[WEATHER], temperature=0,
                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                           max_reasoning_tokens=60)
    assert forced.finish_reason == "tool_calls" and forced.tool_calls[0]["function"]["name"] == "get_weather"
    import jsonschema

    jsonschema.validate(json.loads(forced.tool_calls[0]["function"]["arguments"]),
                        WEATHER["function"]["parameters"])
    # "none": the weather question gets no call, however much the model wants one
    none = demo_llm.chat(weather, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=200,
                         max_reasoning_tokens=60)
    assert not none.tool_calls and none.finish_reason in ("stop", "length")
