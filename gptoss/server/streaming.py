"""Plumbing shared by the endpoints: SSE framing, merging several choices' streams, and
cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from gptoss.engine.engine import StepOutput
from gptoss.server.async_engine import EngineFailed, RequestStream
from gptoss.server.errors import APIError

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(data: Any, event: str | None = None) -> str:
    """One server-sent event: `data: {...}` (with `event: name` first for the Responses API)."""
    payload = data if isinstance(data, str) else dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """(choice index, step output) from several requests, in arrival order."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first (non-streaming requests).

    Once the body has been read, the next ASGI receive() returns only when the client goes away.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
            raise ClientDisconnected()
    return task.result()


class Generation:
    """What the three generating endpoints share: a request's engine streams and its choices,
    feeding them, ending them, and answering at once or as a stream. Subclasses write `collect`
    (the JSON body) and `stream` (the SSE events)."""

    def __init__(self, streams: list[RequestStream], choices: list):
        self.streams, self.choices = streams, choices

    def feed(self, index: int, out: StepOutput) -> list:
        """The choice's new pieces; a choice that ended early (a stop string) ends in the engine too."""
        choice = self.choices[index]
        pieces = choice.feed(out)
        if choice.done and not out.finished:
            self.streams[index].abort("stop")
        return pieces

    def abort_all(self) -> None:
        for stream in self.streams:
            stream.abort()

    async def collect(self) -> dict:
        raise NotImplementedError

    def stream(self) -> AsyncIterator[str]:
        raise NotImplementedError

    @staticmethod
    def failed_event(exc: EngineFailed) -> str:
        """The error event a stream ends with when the engine failed (then `[DONE]`)."""
        return sse(APIError(500, str(exc), type="server_error", code="engine_failed").body())

    async def respond(self, request: Request, streaming: bool) -> Response:
        if streaming:
            return StreamingResponse(self.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            body = await unless_disconnected(request, self.collect())
        except ClientDisconnected:
            return Response(status_code=499)
        except EngineFailed as exc:
            raise APIError(500, str(exc), type="server_error", code="engine_failed") from None
        finally:
            self.abort_all()
        return JSONResponse(body)
