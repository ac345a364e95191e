"""An OpenAI-compatible HTTP server for gptoss (`gptoss serve`).

    app.py               routes, API key, request metrics, serve()
    async_engine.py      the only door to the engine: a stepping thread, asyncio queues, 429 bound
    protocol.py          request bodies (strict pydantic models)
    chat_completions.py  /v1/chat/completions
    responses.py         /v1/responses (+ stored responses)
    completions.py       /v1/completions
    outputs.py           engine steps -> reasoning / text / tool-call segments, usage, logprobs
    streaming.py         SSE framing, merging choices, cancelling on disconnect
    state.py             what the endpoints share; sampling parameters from request fields
    errors.py            OpenAI-style error bodies for every failure
    metrics.py           Prometheus text format
"""

from gptoss.server.app import build_state, create_app, run, serve

__all__ = ["create_app", "build_state", "run", "serve"]
