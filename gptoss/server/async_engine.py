"""The one interface between the HTTP server and the engine.

`AsyncEngine` owns an `LLMEngine` and runs `engine.step()` in a single background thread, so
torch work never blocks the event loop and the engine is only ever touched by that thread.
Endpoints submit requests and read each request's `StepOutput`s from an asyncio queue:

    streams = await engine.submit_many([(prompt_ids, params, "req-1")])   # 429 / 400 raise here
    async for step in streams[0]: ...                                      # StepOutputs
    streams[0].abort()                                                     # consumer gone: free its cache

    async for step in engine.generate(prompt_ids, params, "req-2"): ...    # the same, one request

Commands (add, abort) go to the engine thread through a thread-safe queue; outputs come back
through `loop.call_soon_threadsafe`. Admission is bounded: at most max_num_seqs running plus
max_queue waiting requests; past that `EngineOverloaded` (HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Sequence

from gptoss.engine.engine import StepOutput
from gptoss.parallel import ParallelError
from gptoss.sampling import SamplingParams
from gptoss.server.metrics import ServerMetrics

log = logging.getLogger("gptoss.server")


class EngineOverloaded(Exception):
    """More requests than max_num_seqs + max_queue: the caller should answer 429."""

    def __init__(self, limit: int):
        super().__init__(f"at capacity: {limit} requests running or queued")
        self.limit = limit


class EngineFailed(RuntimeError):
    """The engine raised while stepping; the requests in that step cannot continue."""


class EngineDraining(Exception):
    """The server is shutting down: it takes no new requests (HTTP 503)."""


class RequestStream:
    """One request's step outputs, in order; iteration ends after the finished one."""

    def __init__(self, owner: "AsyncEngine", request_id: str, num_prompt_tokens: int, arrival: float):
        self.owner, self.request_id = owner, request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = arrival
        self.first_token_time: float | None = None
        self.queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self.finished = False  # no more outputs will come (finished, failed or aborted)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, reason: str = "abort") -> None:
        """Stop the request (client gone, stop string matched); frees its KV cache. Idempotent."""
        if not self.finished:
            while not self.queue.empty():  # outputs not yet read are dropped
                self.queue.get_nowait()
            self.owner._abort(self, reason)


class AsyncEngine:
    def __init__(self, engine, *, max_queue: int = 64, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.max_num_seqs = engine.max_num_seqs
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.context_length = engine.context_length
        self.kv_cache_tokens = engine.kv_cache_tokens
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side: admitted, not finished
        self._live: set[str] = set()  # engine-thread side: request ids inside the engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False  # shutting down: new requests get EngineDraining
        self.fatal: BaseException | None = None  # a failure the engine cannot serve after (a lost rank)
        self.on_fatal = None  # called on the event loop after `fatal` is set (the server exits)
        # With tensor parallelism, the other ranks (gptoss.engine.distributed.Ranks).
        self._ranks = getattr(getattr(engine, "model", None), "ranks", None)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self.max_num_seqs + self.max_queue

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self._thread.start()

    async def drain(self, timeout: float) -> int:
        """Stop admitting requests, wait up to `timeout` seconds for the running ones to finish,
        then end the rest with an error ("the server is shutting down"). Returns how many were ended."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = list(self._streams.values())
        for stream in cut:
            self._end(stream, "abort", EngineFailed("the server is shutting down"))
            self._commands.put(("abort", stream.request_id))
        return len(cut)

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._commands.put(("wake",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
        self._thread = None
        for stream in list(self._streams.values()):
            self._end(stream, "abort", EngineFailed("the server is shutting down"))
        if self._ranks is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._ranks.close)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting ----------------------------------------------------------------------------
    async def submit_many(self, requests: Sequence[tuple], *, arrival: float | None = None) -> list[RequestStream]:
        """Admit all requests, each (prompt ids, params, request id[, structured-output constraint]),
        or none. Raises EngineOverloaded, or the engine's RequestError (a ValueError: prompt too long
        for the context or the cache)."""
        if self._thread is None:
            raise EngineFailed("the engine is not running")
        if self.draining:
            raise EngineDraining("the server is shutting down")
        if len(self._streams) + len(requests) > self.limit:
            self.metrics.rejected.inc()
            raise EngineOverloaded(self.limit)
        arrival = time.monotonic() if arrival is None else arrival
        streams, futures = [], []
        for prompt_ids, params, request_id, *_ in requests:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
        for prompt_ids, params, request_id, *constraint in requests:
            stream = RequestStream(self, request_id, len(prompt_ids), arrival)
            self._streams[request_id] = stream
            future = self._loop.create_future()
            self._commands.put(("add", request_id, list(prompt_ids), params, (constraint or [None])[0], future))
            streams.append(stream)
            futures.append(future)
        self._update_queue_gauges()
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:  # cancelled while waiting for admission (client gone)
            for stream in streams:
                stream.abort()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for stream, result in zip(streams, results):
                if isinstance(result, BaseException):
                    self._end(stream, "rejected")
                else:
                    stream.abort()
            raise errors[0]
        return streams

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[StepOutput]:
        """Step outputs of one request; closing the iterator early aborts the request."""
        (stream,) = await self.submit_many([(prompt_ids, params, request_id)])
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    # -- event-loop side -------------------------------------------------------------------------
    def _abort(self, stream: RequestStream, reason: str) -> None:
        self._end(stream, reason)
        self._commands.put(("abort", stream.request_id))

    def _end(self, stream: RequestStream, reason: str, error: BaseException | None = None) -> None:
        if stream.finished:
            return
        stream.finished = True
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        stream.queue.put_nowait(error if error is not None else StopAsyncIteration())
        if reason != "rejected":
            self.metrics.finished.inc(1, reason)
            self.metrics.latency.observe(time.monotonic() - stream.arrival)
        self._update_queue_gauges()

    def _update_queue_gauges(self) -> None:
        self.metrics.running.set(len(self._streams))
        self.metrics.queued.set(max(0, len(self._streams) - self.max_num_seqs))

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if stream.first_token_time is None and out.token_id is not None:
                stream.first_token_time = now
                self.metrics.ttft.observe(now - stream.arrival)
            stream.queue.put_nowait(out)
            if out.finished:
                self._end(stream, out.finish_reason or "stop")

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._end(stream, "error", error)

    @staticmethod
    def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._drain(block=not engine.has_unfinished())
            if self._ranks is not None and self._ranks.failure is not None:  # found by the heartbeat
                return self._give_up(self._ranks.failure)
            if self._stopping or not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except ParallelError as exc:  # a rank died or hung: nothing can run any more
                return self._give_up(exc)
            except Exception as exc:  # a bug or out of memory: fail this batch, keep serving
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._record(outputs)
            for out in outputs:
                if out.finished:
                    self._live.discard(out.request_id)
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _give_up(self, exc: BaseException) -> None:
        log.error("the engine cannot continue: %s", exc)
        self.fatal = exc
        self._fail_all(exc)
        if self.on_fatal is not None:
            self._loop.call_soon_threadsafe(self.on_fatal)

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, constraint, future = command
            try:
                self.engine.add_request(prompt_ids, params, request_id, constraint=constraint)
                self._live.add(request_id)
                error = None
            except Exception as exc:  # RequestError (400) or a bug; either way the caller hears of it
                error = exc
            self._loop.call_soon_threadsafe(self._resolve, future, error)
        elif kind == "abort":
            _, request_id = command
            if request_id in self._live:
                self._live.discard(request_id)
                try:
                    self.engine.abort(request_id)
                except Exception:
                    log.exception("aborting %s failed", request_id)
                self.metrics.kv_usage.set(self.engine.kv_usage())

    def _fail_all(self, exc: Exception) -> None:
        error = EngineFailed(f"the engine failed: {type(exc).__name__}: {exc}")
        for request_id in list(self._live):
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("aborting %s failed", request_id)
            self._loop.call_soon_threadsafe(self._fail, request_id, error)
        self._live.clear()

    def _record(self, outputs: list[StepOutput]) -> None:
        m, stats = self.metrics, self.engine.stats
        m.steps.inc()
        m.batch_size.set(stats.last_batch_size)
        m.batch_sizes.observe(stats.last_batch_size)
        m.kv_usage.set(stats.kv_usage)
        m.generation_tokens.inc(len(outputs))
        for out in outputs:
            if out.output_tokens == 1:
                m.prompt_tokens.inc(out.prompt_tokens)
                m.cached_tokens.inc(out.cached_tokens)
