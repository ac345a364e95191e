"""What every endpoint needs: the engine, the tokenizer, the served name, and shared helpers."""

from __future__ import annotations

import functools
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gptoss.engine.engine import RequestError
from gptoss.sampling import SamplingParams
from gptoss.server.async_engine import AsyncEngine, EngineDraining, EngineFailed, EngineOverloaded, RequestStream
from gptoss.server.errors import APIError, bad_request, from_value_error, model_not_found, overloaded, shutting_down


class ResponseStore:
    """Stored Responses API results (for previous_response_id and GET), newest kept, oldest dropped."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        self._items[response["id"]] = (response, conversation)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]] | None:
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


@dataclass
class ServerState:
    engine: AsyncEngine
    encoding: Any  # openai-harmony encoding
    text_encoding: Any  # tiktoken encoding
    model_name: str
    api_key: str | None = None
    strict_params: bool = False  # refuse unknown top-level request fields (default: ignore them, with a warning)
    model_root: str | None = None  # where the model was loaded from (/v1/models "root")
    ui: bool = True  # serve the chat page at /
    created: int = field(default_factory=lambda: int(time.time()))
    responses: ResponseStore = field(default_factory=ResponseStore)
    background: dict = field(default_factory=dict)  # response id -> its running ResponseRun

    @property
    def metrics(self):
        return self.engine.metrics

    @functools.cached_property
    def structurer(self):
        from gptoss.structured import Structurer

        return Structurer(self.text_encoding, self.text_encoding.n_vocab)

    def constraints(self, grammar: str | None, count: int) -> list:
        """One TokenMatcher per choice (each keeps its own place in the grammar), or Nones."""
        return [self.structurer.matcher(grammar) for _ in range(count)]

    def token_bytes(self, token_id: int) -> bytes:
        return self.text_encoding.decode_single_token_bytes(token_id)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise model_not_found(name)

    async def submit(self, requests: list[tuple], arrival: float,
                     param: str = "messages") -> list[RequestStream]:
        """Submit every choice's request; engine refusals become API errors."""
        if len(requests) > self.engine.limit:
            raise bad_request(f"this request needs {len(requests)} generations (prompts x n); the server holds at "
                              f"most {self.engine.limit} at once", "n")
        try:
            return await self.engine.submit_many(requests, arrival=arrival)
        except EngineOverloaded as exc:
            raise overloaded(exc.limit) from None
        except EngineDraining:
            raise shutting_down() from None
        except RequestError as exc:
            too_long = "tokens per request" in str(exc)
            raise APIError(400, str(exc), param=param,
                           code="context_length_exceeded" if too_long else "invalid_value") from None
        except EngineFailed as exc:
            raise APIError(503, str(exc), type="server_error", code="engine_unavailable") from None


def sampling_params(fields: dict[str, Any], *, n: int = 1, names: dict[str, str] | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice. With n > 1 and a seed, choice i uses seed + i.

    `names` maps SamplingParams names to the endpoint's own (max_tokens -> max_output_tokens) for errors."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if "stop_token_ids" in fields:
        fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    try:
        base = SamplingParams.from_kwargs(**fields)
    except ValueError as exc:
        error = from_value_error(exc)
        for ours, theirs in (names or {}).items():
            error.message = re.sub(rf"\b{ours}\b", theirs, error.message)
            if error.param == ours:
                error.param = theirs
        raise error from None
    if n == 1:
        return [base]
    out = []
    for i in range(n):
        seed = None if base.seed is None else (base.seed + i) % 2**64
        out.append(SamplingParams.from_kwargs(**{**fields, "seed": seed}))
    return out


def reject_logit_bias(logit_bias: dict | None) -> None:
    if logit_bias:
        raise bad_request("logit_bias is not supported by this server.", "logit_bias", "unsupported_parameter")


def require_json_schema(schema: dict | None, param: str) -> None:
    """Only presence is checked here: whether it is a valid schema, `gptoss.structured` checks
    when it compiles the grammar (naming the part at fault)."""
    if schema is None:
        raise bad_request("a json_schema response format needs a 'schema' object.", param, "missing_required_parameter")
