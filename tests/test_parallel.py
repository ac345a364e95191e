"""Tensor and expert parallelism: each rank's slices, and N gloo ranks against one process."""

from __future__ import annotations

import dataclasses
import multiprocessing

import pytest
import torch

from gptoss import parallel
from gptoss.config import ModelConfig
from gptoss.model import Model
from gptoss.parallel import Shard
from gptoss.engine.distributed import free_port

SHAPES = {
    # name: (config overrides, layout); GQA groups 2, 5 and 1; 4 and 32 experts; 5 heads (prime)
    "gqa2-4experts": (dict(), "hf"),
    "gqa5-32experts-float": (dict(num_attention_heads=5, num_key_value_heads=1, num_experts=32,
                                  experts_per_token=4, intermediate_size=96, expert_format="float"), "hf"),
    "gqa1-original": (dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=128), "original"),
}


def shape_config(name: str) -> ModelConfig:
    overrides, _ = SHAPES[name]
    return dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=3000, **overrides)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from gptoss.synth import write_random_checkpoint

    root = tmp_path_factory.mktemp("parallel")
    paths = {}
    for name, (_, layout) in SHAPES.items():
        paths[name] = root / name
        write_random_checkpoint(paths[name], shape_config(name), seed=3, layout=layout)
    return paths


# -- the slices, for every N from 1 to 8 -----------------------------------------------------------

@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("world", range(1, 9))
def test_every_part_is_held_exactly_once(name, world):
    config = shape_config(name)
    group = config.num_attention_heads // config.num_key_value_heads
    shards = [Shard(r, world) for r in range(world)]
    q = [h for s in shards for h in s.q_heads(config)]
    assert q == list(range(config.num_attention_heads))
    for s in shards:  # each rank holds the kv heads its q heads read, in the layout attention expects
        qs, kvs = s.q_heads(config), s.kv_heads(config)
        if qs:
            local_group = len(qs) // len(kvs)
            assert [kvs[i // local_group] for i in range(len(qs))] == [h // group for h in qs]
    blocks = [s.intermediate(config) for s in shards]
    assert blocks[0][0] == 0 and blocks[-1][1] == config.intermediate_size
    assert all(a % 32 == 0 and a <= b for a, b in blocks) and all(blocks[i][1] == blocks[i + 1][0]
                                                                  for i in range(world - 1))
    experts = [Shard(r, world, expert_parallel=True).experts(config) for r in range(world)]
    assert sum(b - a for a, b in experts) == config.num_experts
    vocab = [s.vocab(config) for s in shards]
    assert vocab[-1][1] == config.vocab_size and sum(b - a for a, b in vocab) == config.vocab_size


def test_one_rank_is_the_whole_model(checkpoints):
    whole = Model.from_pretrained(checkpoints["gqa2-4experts"], dtype=torch.float32)
    same = Model.from_pretrained(checkpoints["gqa2-4experts"], dtype=torch.float32, shard=Shard(0, 1))
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    assert torch.equal(whole(ids), same(ids))
    assert not torch.distributed.is_initialized()


# -- N processes over gloo --------------------------------------------------------------------------

def _rank_logits(rank: int, world: int, port: int, jobs: list, results) -> None:
    torch.set_num_threads(1)
    parallel.init(rank, world, init_method=f"tcp://127.0.0.1:{port}")
    parallel.ready()
    try:
        for key, path, expert_parallel, ids in jobs:
            model = Model.from_pretrained(path, dtype=torch.float32, shard=Shard(rank, world, expert_parallel))
            logits = model(ids)
            if rank == 0:
                results.put((key, logits))
            else:
                assert logits is None
    finally:
        parallel.shutdown()


def run_ranks(world: int, jobs: list) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_logits, args=(r, world, port, jobs, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in jobs:
            key, logits = results.get(timeout=240)
            out[key] = logits
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_logits_equal_one_process(checkpoints, world):
    ids = torch.tensor([[3, 17, 250, 9, 1200, 44, 2999, 0, 5, 61]] * 2)
    ids[1] = ids[1].flip(0)
    jobs = [((name, ep), checkpoints[name], ep, ids) for name in SHAPES for ep in (False, True)]
    got = run_ranks(world, jobs)
    for (name, ep), logits in got.items():
        want = Model.from_pretrained(checkpoints[name], dtype=torch.float32)(ids)
        err = (logits - want).abs().max().item()
        assert err <= 1e-5, f"{name} expert_parallel={ep} world={world}: max |diff| {err}"


def test_eight_ranks_on_a_four_head_model(checkpoints):
    """More ranks than kv heads, heads and MXFP4 blocks: some ranks hold nothing of a part."""
    ids = torch.tensor([[3, 17, 250, 9, 1200]])
    path = checkpoints["gqa2-4experts"]
    got = run_ranks(8, [(ep, path, ep, ids) for ep in (False, True)])
    want = Model.from_pretrained(path, dtype=torch.float32)(ids)
    for ep, logits in got.items():
        assert (logits - want).abs().max().item() <= 1e-5, ep


# -- the engine, the server and failures ---------------------------------------------------------------

PROMPTS = [[1, 5, 9, 200, 7, 33], [44, 3, 2], list(range(100, 160))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gptoss.cli import main

    path = tmp_path_factory.mktemp("tp") / "tiny"
    assert main(["synth", str(path), "--preset", "tiny", "--seed", "5"]) == 0
    return path


def greedy_tokens(llm) -> list[list[int]]:
    return [r.token_ids for r in llm.generate(PROMPTS, temperature=0, max_tokens=16, ignore_eos=True)]


@pytest.fixture(scope="module")
def one_process_tokens(tiny):
    from gptoss import LLM

    return greedy_tokens(LLM(tiny, dtype=torch.float32))


@pytest.mark.parametrize("world,expert_parallel", [(2, False), (2, True), (3, False)])
def test_engine_greedy_tokens_equal_one_process(tiny, one_process_tokens, world, expert_parallel):
    from gptoss import LLM

    with LLM(tiny, dtype=torch.float32, tensor_parallel_size=world, expert_parallel=expert_parallel) as llm:
        procs = llm.model.ranks.workers.procs
        assert greedy_tokens(llm) == one_process_tokens
    assert all(p.poll() is not None for p in procs)  # close() left no worker behind
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("how", ["kill", "stop", "hang"])
def test_a_lost_worker_fails_cleanly(tiny, monkeypatch, how):
    """A killed worker, or one that stops answering, is named in the error within the step timeout;
    the LLM stays failed, and no worker process is left. "hang" hides the stopped process from
    rank 0's process check, as on another machine: the collective's timeout must catch it."""
    import signal
    import time

    from gptoss import LLM
    from gptoss.parallel import ParallelError

    monkeypatch.setenv("GPTOSS_STEP_TIMEOUT", "5")
    llm = LLM(tiny, tensor_parallel_size=2)
    procs = llm.model.ranks.workers.procs
    llm.generate([1, 2, 3], max_tokens=2)
    if how == "kill":
        procs[0].kill()
        procs[0].wait()
        expected = "rank 1 was killed by SIGKILL"
    elif how == "stop":
        procs[0].send_signal(signal.SIGSTOP)
        expected = "rank 1 is stopped"
    else:
        from gptoss.engine.distributed import LocalWorkers

        monkeypatch.setattr(LocalWorkers, "exited", lambda self: [])
        procs[0].send_signal(signal.SIGSTOP)
        expected = "a rank did not answer within 5 s"
    start = time.monotonic()
    with pytest.raises(ParallelError, match=expected):
        llm.generate([1, 2, 3], max_tokens=4)
    assert time.monotonic() - start < 30
    with pytest.raises(ParallelError, match=expected):
        llm.generate([4, 5], max_tokens=1)
    monkeypatch.undo()
    llm.close()
    assert all(p.poll() is not None for p in procs)
    assert not torch.distributed.is_initialized()


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_serve_two_ranks_answers_the_openai_client_and_fails_cleanly(tiny, tmp_path, monkeypatch):
    import os
    import signal
    import time

    import openai

    from serving import serving

    monkeypatch.setenv("GPTOSS_STEP_TIMEOUT", "5")
    arguments = [str(tiny), "--tensor-parallel-size", "2", "--served-model-name", "tiny", "--kv-cache-size", "4096",
                 "--log-level", "warning", "--max-num-seqs", "4"]
    log = tmp_path / "server.log"
    with serving(arguments, log) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hello"}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                  stream=True)
        chunks = [c for c in streamed]
        assert whole.usage.completion_tokens > 0 and chunks[-1].choices[0].finish_reason is not None
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == (whole.choices[0].message.content or "")

        workers = _children(server.proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=50, temperature=0)
        server.proc.wait(timeout=30)
        assert time.monotonic() - start < 30
        assert server.proc.returncode != 0
    assert "rank 1 was killed by SIGKILL" in log.read_text()


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi", "-tp", "0"], "--tensor-parallel-size 0: give at least 1"),
    (["bench", "--expert-parallel"], "--expert-parallel splits the experts over ranks"),
    (["serve", "--tensor-parallel-size", "-2"], "--tensor-parallel-size -2"),
])
def test_bad_parallel_arguments_are_refused(tiny, capsys, argv, message):
    from gptoss.cli import main

    assert main([argv[0], str(tiny), *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_bench_reports_each_rank(tiny, capsys):
    import json

    from gptoss.cli import main

    assert main(["bench", str(tiny), "-tp", "2", "--prompt-tokens", "16", "--gen-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [m["rank"] for m in result["rank_memory"]] == [0, 1]
    assert all(m["anon_gb"] > 0 for m in result["rank_memory"])
    # two all-reduces per layer and the embedding's, fp32 [1, hidden], and rank 0's logit slice
    config = Model.from_pretrained(tiny).config
    reduces = (2 * config.num_hidden_layers + 1) * config.hidden_size * 4
    assert result["bytes_sent_per_decode_step"] >= reduces


def test_a_worker_that_dies_at_start_is_named(tiny, monkeypatch):
    """A worker gone before it joins: rank 0 stops waiting after GPTOSS_JOIN_TIMEOUT and says who."""
    import time

    from gptoss import LLM
    from gptoss.engine import distributed
    from gptoss.parallel import ParallelError

    start = distributed._start_local_workers

    def start_and_kill(spec):
        workers = start(spec)
        workers.procs[0].kill()
        return workers

    monkeypatch.setattr(distributed, "_start_local_workers", start_and_kill)
    monkeypatch.setenv("GPTOSS_JOIN_TIMEOUT", "5")
    began = time.monotonic()
    with pytest.raises(ParallelError, match="could not start: rank 1 was killed by SIGKILL"):
        LLM(tiny, tensor_parallel_size=2)
    assert time.monotonic() - began < 30
    assert not torch.distributed.is_initialized()


def test_cli_names_a_launcher_mismatch_without_a_traceback(tiny, monkeypatch, capsys):
    from gptoss.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["generate", str(tiny), "--prompt", "hi", "-tp", "2"]) == 1
    assert "--tensor-parallel-size 2 but the launcher started WORLD_SIZE=3" in capsys.readouterr().err
