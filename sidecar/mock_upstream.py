"""The built-in mock LLM upstream: OpenAI- and Anthropic-shaped answers with no network.

``make demo`` (and the benchmarks) put the sidecar in front of this server instead of a
real provider. It answers, under any path prefix (``/openai/v1/chat/completions`` and
``/v1/chat/completions`` are the same endpoint; the match is on the path's suffix):

=============================  =====================================================
``POST …/v1/chat/completions``  Chat Completions, JSON or ``stream: true`` SSE
``POST …/v1/completions``       legacy Completions, JSON or SSE
``POST …/v1/responses``         Responses API, JSON or SSE (``response.created`` …
                                ``response.output_text.delta`` … ``response.completed``)
``POST …/v1/embeddings``        Embeddings (``float`` or ``base64``)
``POST …/v1/messages``          Anthropic Messages, JSON or SSE
``GET  …/v1/models``            a short model list
=============================  =====================================================

What it simulates, in the shapes of the recorded payloads in ``shared/fixtures``:

* **Usage, deterministic per request.** Prompt tokens are ``len(json text of the
  prompt fields) // 4``. The output length, the reasoning share, the cached share and
  the answer's words come from an RNG seeded with ``seed`` and a hash of the request
  body without ``stream``/``stream_options``, so the JSON answer and the stream answer
  to the same request report the same usage. The visible answer has exactly
  ``output tokens - reasoning tokens`` words (one word per streamed delta; words are
  separated by whitespace, a few carry non-ASCII characters to exercise UTF-8 handling).
  A requested cap (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``)
  truncates the answer, with ``finish_reason: length`` / ``stop_reason: max_tokens`` /
  ``status: incomplete`` as the real APIs report it.
* **Token kinds.** OpenAI: ``prompt_tokens_details.cached_tokens`` (sometimes non-zero,
  for any model: the real 1024-token threshold is ignored so that short demo prompts
  show caching) and ``completion_tokens_details.reasoning_tokens`` (non-zero for models
  whose name starts with ``o`` or ``gpt-5``; reasoning is *inside* the output count).
  Anthropic: ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` sometimes
  non-zero, *outside* ``input_tokens``; ``message_delta`` repeats the cumulative usage.
* **Stream shapes.** Chat chunks carry ``"usage":null`` only when the request set
  ``stream_options.include_usage``, and then a final usage chunk with ``"choices":[]``
  precedes ``data: [DONE]``; chunks carry an ``obfuscation`` padding field. Anthropic
  sends ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``…,
  ``content_block_stop``, ``message_delta``, ``message_stop`` and pads some ``data:``
  lines with trailing spaces, as the real API does.
* **Models.** The response ``model`` echoes the request's, resolved to a dated snapshot
  for well-known aliases (``gpt-4o`` → ``gpt-4o-2024-08-06``,
  ``claude-haiku-4-5`` → ``claude-haiku-4-5-20251001``), as the real APIs do.
* **Timing**, multiplied by ``latency_scale`` (0 turns every wait off): time to first
  token 30-300 ms, 5-30 ms between stream chunks, JSON answers 100-800 ms (longer for
  longer answers), errors 20-150 ms.
* **Failures** with probability ``failure_rate``, drawn from an RNG seeded with
  ``seed`` (so a sequence of requests fails the same way every run): 500, 503 (OpenAI),
  529 ``overloaded_error`` (Anthropic), 429 with ``Retry-After``, each with the
  provider's error body and headers; for streams also a connection cut mid-stream (no
  final events, no ``[DONE]``) and, on Anthropic, an ``event: error`` inside a 200
  stream. A request can force one with the header ``x-mock-failure`` (see
  :data:`FAILURE_KINDS`; ``none`` forces success), which tests use.
* **Compression.** JSON bodies (answers and errors) are gzip-compressed when the
  request's ``Accept-Encoding`` allows gzip; with ``gzip_streams=True`` Anthropic SSE
  is too (the real Messages API does this; OpenAI SSE is never compressed).

No API key is needed (any is accepted) and nothing here touches the network beyond the
socket it listens on. Per-token events are rendered from pre-encoded fragments and the
embedding vectors are rendered once per dimension, so the server stays cheap under load.
This module is part of the package only for the demo and benchmarks; the proxy never
imports it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import math
import random
import string
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

__all__ = [
    "FAILURE_KINDS",
    "MOCK_STATS",
    "MockStats",
    "create_mock_app",
    "start_mock_upstream",
]

#: Failure kinds a request may force with the ``x-mock-failure`` header, per provider.
#: ``cut`` closes the connection mid-stream and ``sse_error`` sends an Anthropic
#: ``event: error`` inside a 200 stream; both need ``stream: true``.
FAILURE_KINDS: Final[dict[str, tuple[str, ...]]] = {
    "openai": ("500", "503", "429", "cut"),
    "anthropic": ("500", "529", "429", "cut", "sse_error"),
}
_STREAM_ONLY: Final = frozenset({"cut", "sse_error"})
# Relative frequency of each kind when a failure is drawn at random.
_FAILURE_WEIGHTS: Final[dict[str, int]] = {"429": 3, "500": 2, "503": 2, "529": 2, "cut": 2, "sse_error": 1}

_ENDPOINTS: Final[tuple[tuple[str, str], ...]] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/responses", "responses"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/messages", "messages"),
    ("/v1/models", "models"),
)

# Aliases the real APIs resolve to a dated snapshot in the response's ``model``.
_SNAPSHOTS: Final[dict[str, str]] = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}

_WORDS: Final = (
    "the", "model", "answer", "token", "latency", "request", "stream", "tenant", "cost", "usage",
    "report", "summary", "of", "and", "to", "in", "a", "is", "for", "with", "data", "system", "result",
    "value", "first", "next", "then", "because", "however", "quickly", "carefully", "measured",
    "observed", "expected", "cache", "prompt", "budget", "window", "alert", "metric", "trace", "span",
    "café", "naïve", "déjà", "größe", "🙂", "→", "—", "42", "3.14", "(see", "below)", "note:", "done.",
)  # fmt: skip
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_PRETTY = json.JSONEncoder(ensure_ascii=False, indent=2)


def _js(value: Any) -> str:
    """Compact JSON text, non-ASCII kept as UTF-8 (as the providers send it)."""
    return _JSON.encode(value)


# Every token text the answers can contain, JSON-encoded once: the first word, words
# after a space, and (rarely) words after a paragraph break.
_FIRST: Final = tuple(w[:1].upper() + w[1:] for w in _WORDS)
_SPACED: Final = tuple(" " + w for w in _WORDS)
_PARA: Final = tuple("\n\n" + w for w in _FIRST)
_TOKEN_JSON: Final[dict[str, str]] = {t: _js(t) for t in (*_FIRST, *_SPACED, *_PARA)}
_ID_ALPHABET: Final = string.ascii_letters + string.digits
_ANTHROPIC_PADS: Final = ("", "", "", " ", "     ", "         ", "              ")


@dataclass
class MockStats:
    """What the mock has served: requests per endpoint and injected failures per kind."""

    requests: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


#: The :class:`MockStats` of an app made by :func:`create_mock_app`.
MOCK_STATS: Final = web.AppKey("mock_stats", MockStats)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The deterministic outcome of one request: usage figures and the answer's words."""

    model: str
    prompt_tokens: int
    output_tokens: int  # includes reasoning_tokens
    reasoning_tokens: int
    cached_tokens: int  # OpenAI cached / Anthropic cache read
    cache_creation_tokens: int  # Anthropic only
    words: tuple[str, ...]  # visible tokens as they appear in the text
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(self.words)

    @property
    def anthropic_input(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_creation_tokens


@dataclass(slots=True)
class _Stream:
    """A stream split where the timing differs: sent with the headers, with the first
    token, one element per token, and after the last token."""

    early: str
    first: str
    tokens: list[str]
    tail: str
    error_event: str = ""  # Anthropic ``event: error`` (for the ``sse_error`` failure)


class _Mock:
    """The server's state: RNGs, settings, pre-rendered fragments and statistics."""

    def __init__(self, seed: int, failure_rate: float, latency_scale: float, gzip_streams: bool) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate}")
        if latency_scale < 0 or not math.isfinite(latency_scale):
            raise ValueError(f"latency_scale must be finite and >= 0, got {latency_scale}")
        self.seed = seed
        self.failure_rate = failure_rate
        self.latency_scale = latency_scale
        self.gzip_streams = gzip_streams
        self.rng = random.Random(seed)  # timing, failures and ids, in request order
        self.stats = MockStats()
        pad_rng = random.Random(f"pads:{seed}")
        self.pads = tuple("".join(pad_rng.choices(_ID_ALPHABET, k=pad_rng.randint(1, 16))) for _ in range(61))
        self._vectors: dict[tuple[int, str], str] = {}

    # -- helpers -------------------------------------------------------------------

    def _id(self, n: int) -> str:
        return "".join(self.rng.choices(_ID_ALPHABET, k=n))

    def _delay(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high) * self.latency_scale

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    def _request_rng(self, body: dict[str, Any]) -> random.Random:
        """An RNG that depends only on the seed and the request (not on ``stream``)."""
        canonical = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        digest = hashlib.sha256(f"{self.seed}:{_js(canonical)}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _headers(
        self, provider: str, content_type: str, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        if provider == "openai":
            headers.update(
                {
                    "openai-version": "2020-10-01",
                    "x-request-id": "req_" + self.rng.randbytes(16).hex(),
                    "x-ratelimit-limit-requests": "10000",
                    "x-ratelimit-limit-tokens": "2000000",
                    "x-ratelimit-remaining-requests": "9999",
                    "x-ratelimit-remaining-tokens": "1999000",
                    "x-ratelimit-reset-requests": "6ms",
                    "x-ratelimit-reset-tokens": "30ms",
                }
            )
        else:
            headers.update(
                {
                    "request-id": "req_" + self._id(24),
                    "anthropic-ratelimit-requests-limit": "4000",
                    "anthropic-ratelimit-requests-remaining": "3999",
                    "anthropic-ratelimit-input-tokens-limit": "400000",
                    "anthropic-ratelimit-input-tokens-remaining": "399000",
                    "anthropic-ratelimit-output-tokens-limit": "80000",
                    "anthropic-ratelimit-output-tokens-remaining": "79000",
                }
            )
        if extra:
            headers.update(extra)
        return headers

    def _json_response(self, status: int, body: bytes, headers: dict[str, str], gz: bool) -> web.Response:
        if gz:
            body = gzip.compress(body, compresslevel=5, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return web.Response(status=status, body=body, headers=headers)

    # -- errors --------------------------------------------------------------------

    def _error_body(self, provider: str, status: int, etype: str, message: str, code: str | None) -> bytes:
        if provider == "anthropic":
            return _js(
                {
                    "type": "error",
                    "error": {"type": etype, "message": message},
                    "request_id": "req_" + self._id(24),
                }
            ).encode()
        err = {"error": {"message": message, "type": etype, "param": None, "code": code}}
        return (json.dumps(err, indent=4) + "\n").encode()

    def _client_error(self, provider: str, status: int, message: str, gz: bool) -> web.Response:
        """A 4xx the real API would give for a malformed request (never random)."""
        etype = "not_found_error" if provider == "anthropic" and status == 404 else "invalid_request_error"
        code = "unknown_url" if status == 404 else None
        body = self._error_body(provider, status, etype, message, code)
        return self._json_response(status, body, self._headers(provider, "application/json"), gz)

    async def _failure_response(self, provider: str, kind: str, model: str, gz: bool) -> web.Response:
        extra: dict[str, str] = {}
        if kind == "429":
            status = 429
            retry = self.rng.randint(1, 5)
            extra["retry-after"] = str(retry)
            if provider == "openai":
                etype, code = "requests", "rate_limit_exceeded"
                message = (
                    f"Rate limit reached for {model} in organization org-mock on requests per min (RPM): "
                    f"Limit 10000, Used 10000, Requested 1. Please try again in {retry}s. "
                    "Visit https://platform.openai.com/account/rate-limits to learn more."
                )
                extra["x-ratelimit-remaining-requests"] = "0"
                extra["x-ratelimit-reset-requests"] = f"{retry}s"
            else:
                etype, code = "rate_limit_error", None
                message = (
                    "This request would exceed the rate limit for your organization of 4,000 requests per "
                    "minute. For details, refer to: https://docs.claude.com/en/api/rate-limits."
                )
                extra["anthropic-ratelimit-requests-remaining"] = "0"
                extra["x-should-retry"] = "true"
        elif kind == "529":
            status, etype, code, message = 529, "overloaded_error", None, "Overloaded"
            extra["x-should-retry"] = "true"
        elif kind == "503":
            status, etype, code = 503, "server_error", None
            message = "The server is overloaded or not ready yet."
        else:  # "500"
            status, code = 500, None
            if provider == "anthropic":
                etype, message = "api_error", "Internal server error"
                extra["x-should-retry"] = "true"
            else:
                etype = "server_error"
                message = (
                    "The server had an error while processing your request. Sorry about that! You can "
                    "retry your request, or contact us through our help center at help.openai.com if the "
                    "error persists."
                )
        await self._sleep(self._delay(0.02, 0.15))
        body = self._error_body(provider, status, etype, message, code)
        return self._json_response(status, body, self._headers(provider, "application/json", extra), gz)

    def _pick_failure(self, request: web.Request, provider: str, stream: bool) -> str | None:
        """The failure to inject: forced by ``x-mock-failure``, else drawn from the seeded RNG.

        Raises ``ValueError`` for a forced kind that does not apply to this request.
        """
        forced = request.headers.get("x-mock-failure")
        if forced is not None:
            forced = forced.strip().lower()
            if forced == "none":
                return None
            if forced not in FAILURE_KINDS[provider]:
                raise ValueError(
                    f"x-mock-failure: {forced!r} is not one of {FAILURE_KINDS[provider]} or 'none'"
                )
            if forced in _STREAM_ONLY and not stream:
                raise ValueError(f"x-mock-failure: {forced!r} needs a streaming request")
            return forced
        if self.failure_rate <= 0 or self.rng.random() >= self.failure_rate:
            return None
        kinds = [k for k in FAILURE_KINDS[provider] if stream or k not in _STREAM_ONLY]
        return self.rng.choices(kinds, weights=[_FAILURE_WEIGHTS[k] for k in kinds])[0]

    # -- the request's outcome -----------------------------------------------------

    def _plan(self, endpoint: str, body: dict[str, Any]) -> _Plan:
        rr = self._request_rng(body)
        requested = str(body["model"])
        model = _SNAPSHOTS.get(requested, requested)
        if endpoint == "chat":
            prompt_src: Any = [body.get("messages"), body.get("tools")]
            cap = body.get("max_completion_tokens", body.get("max_tokens"))
        elif endpoint == "completions":
            prompt_src, cap = body.get("prompt"), body.get("max_tokens", 16)
        elif endpoint == "responses":
            prompt_src = [body.get("instructions"), body.get("input"), body.get("tools")]
            cap = body.get("max_output_tokens")
        elif endpoint == "messages":
            prompt_src = [body.get("system"), body.get("messages"), body.get("tools")]
            cap = body.get("max_tokens")
        else:  # embeddings: prompt only
            prompt = _embedding_tokens(body.get("input"))
            return _Plan(model, prompt, 0, 0, 0, 0, (), False)
        prompt = max(1, len(_js(prompt_src)) // 4)

        visible = max(1, min(1500, int(rr.lognormvariate(4.3, 0.7))))  # median ~75 words
        reasoning = 0
        if endpoint in ("chat", "responses") and (requested.startswith("o") or requested.startswith("gpt-5")):
            effort = body.get("reasoning_effort")
            reasoning_opts = body.get("reasoning")
            if effort is None and isinstance(reasoning_opts, dict):
                effort = reasoning_opts.get("effort")
            weight = {"minimal": 0, "low": 1, "medium": 2, "high": 4}.get(str(effort), 2)
            reasoning = 32 * rr.randint(1, 6) * weight
        total = visible + reasoning
        truncated = False
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1 and total > cap:
            # The cap cuts both kinds in proportion; at least one visible word remains.
            truncated = True
            reasoning = min(cap - 1, reasoning * cap // total)
            visible = cap - reasoning
            total = cap

        cached = creation = 0
        roll = rr.random()
        if endpoint == "messages":
            if roll < 0.30:
                cached = prompt * rr.randint(60, 95) // 100
            elif roll < 0.45:
                creation = prompt * rr.randint(60, 95) // 100
        elif endpoint != "completions" and roll < 0.35:
            cached = prompt * rr.randint(50, 95) // 100

        words = [rr.choice(_FIRST)]
        for _ in range(visible - 1):
            words.append(rr.choice(_PARA) if rr.random() < 0.03 else rr.choice(_SPACED))
        return _Plan(model, prompt, total, reasoning, cached, creation, tuple(words), truncated)

    # -- OpenAI Chat Completions ---------------------------------------------------

    @staticmethod
    def _chat_usage(plan: _Plan) -> dict[str, Any]:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.output_tokens,
            "total_tokens": plan.prompt_tokens + plan.output_tokens,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": plan.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _fingerprint(self, model: str) -> str | None:
        if model.startswith("gpt-5"):
            return None  # recorded as null for gpt-5 models
        return "fp_" + hashlib.sha256(model.encode()).hexdigest()[:10]

    def _chat_json(self, plan: _Plan) -> bytes:
        body = {
            "id": "chatcmpl-" + self._id(29),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": plan.text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "length" if plan.truncated else "stop",
                }
            ],
            "usage": self._chat_usage(plan),
            "service_tier": "default",
            "system_fingerprint": self._fingerprint(plan.model),
        }
        return _PRETTY.encode(body).encode()

    def _chat_stream(self, plan: _Plan, include_usage: bool) -> _Stream:
        head = (
            f'data: {{"id":"chatcmpl-{self._id(29)}","object":"chat.completion.chunk",'
            f'"created":{int(time.time())},"model":{_js(plan.model)},"service_tier":"default",'
            f'"system_fingerprint":{_js(self._fingerprint(plan.model))},"choices":'
        )
        mid = ',"usage":null,"obfuscation":"' if include_usage else ',"obfuscation":"'
        pads = self.pads
        offset = self.rng.randrange(len(pads))

        def chunk(i: int, choices: str) -> str:
            return head + choices + mid + pads[(offset + i) % len(pads)] + '"}\n\n'

        tokens = [
            chunk(
                i,
                f'[{{"index":0,"delta":{{"content":{_TOKEN_JSON[w]}}},"logprobs":null,"finish_reason":null}}]',
            )
            for i, w in enumerate(plan.words, 1)
        ]
        finish = "length" if plan.truncated else "stop"
        tail = chunk(0, f'[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{finish}"}}]')
        if include_usage:
            tail += f'{head}[],"usage":{_js(self._chat_usage(plan))},"obfuscation":"{pads[offset]}"}}\n\n'
        tail += "data: [DONE]\n\n"
        first = chunk(
            0,
            '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]',
        )
        return _Stream("", first, tokens, tail)

    # -- OpenAI legacy Completions -------------------------------------------------

    @staticmethod
    def _completion_usage(plan: _Plan) -> dict[str, Any]:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.output_tokens,
            "total_tokens": plan.prompt_tokens + plan.output_tokens,
        }

    def _completions_json(self, plan: _Plan) -> bytes:
        body = {
            "id": "cmpl-" + self._id(29),
            "object": "text_completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {
                    "text": plan.text,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "length" if plan.truncated else "stop",
                }
            ],
            "usage": self._completion_usage(plan),
        }
        return _PRETTY.encode(body).encode()

    def _completions_stream(self, plan: _Plan, include_usage: bool) -> _Stream:
        cid, created, model = "cmpl-" + self._id(29), int(time.time()), _js(plan.model)
        head = f'data: {{"id":"{cid}","object":"text_completion","created":{created},"choices":'
        end = f',"model":{model}' + (',"usage":null}\n\n' if include_usage else "}\n\n")
        tokens = [
            f'{head}[{{"text":{_TOKEN_JSON[w]},"index":0,"logprobs":null,"finish_reason":null}}]{end}'
            for w in plan.words
        ]
        finish = "length" if plan.truncated else "stop"
        tail = f'{head}[{{"text":"","index":0,"logprobs":null,"finish_reason":"{finish}"}}]{end}'
        if include_usage:
            tail += f"{head}[]" + f',"model":{model},"usage":{_js(self._completion_usage(plan))}}}\n\n'
        tail += "data: [DONE]\n\n"
        return _Stream("", "", tokens, tail)

    # -- OpenAI Responses ----------------------------------------------------------

    @staticmethod
    def _responses_usage(plan: _Plan) -> dict[str, Any]:
        return {
            "input_tokens": plan.prompt_tokens,
            "input_tokens_details": {"cached_tokens": plan.cached_tokens},
            "output_tokens": plan.output_tokens,
            "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
            "total_tokens": plan.prompt_tokens + plan.output_tokens,
        }

    def _response_object(self, plan: _Plan, body: dict[str, Any], rid: str) -> dict[str, Any]:
        """The ``response`` object as ``response.created`` shows it (status in_progress)."""
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
        is_reasoning = plan.reasoning_tokens > 0 or plan.model.startswith(("o", "gpt-5"))
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": plan.model,
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "prompt_cache_key": None,
            "reasoning": {
                "effort": (reasoning or {}).get("effort", "medium") if is_reasoning else None,
                "summary": None,
            },
            "safety_identifier": None,
            "service_tier": "auto",
            "store": body.get("store", True),
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": {},
        }

    def _response_items(self, plan: _Plan) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The finished output items: a reasoning item (reasoning models) and the message."""
        reasoning_item = None
        if plan.reasoning_tokens:
            reasoning_item = {"id": "rs_" + self.rng.randbytes(24).hex(), "type": "reasoning", "summary": []}
        message = {
            "id": "msg_" + self.rng.randbytes(24).hex(),
            "type": "message",
            "status": "incomplete" if plan.truncated else "completed",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": plan.text}],
            "role": "assistant",
        }
        return reasoning_item, message

    def _finish_response(self, obj: dict[str, Any], plan: _Plan, items: list[dict[str, Any]]) -> None:
        obj["status"] = "incomplete" if plan.truncated else "completed"
        obj["completed_at"] = None if plan.truncated else int(time.time())
        if plan.truncated:
            obj["incomplete_details"] = {"reason": "max_output_tokens"}
        obj["output"] = items
        obj["service_tier"] = "default"
        obj["usage"] = self._responses_usage(plan)

    def _responses_json(self, plan: _Plan, body: dict[str, Any]) -> bytes:
        obj = self._response_object(plan, body, "resp_" + self.rng.randbytes(25).hex())
        reasoning_item, message = self._response_items(plan)
        self._finish_response(obj, plan, [i for i in (reasoning_item, message) if i is not None])
        return _PRETTY.encode(obj).encode()

    def _responses_stream(self, plan: _Plan, body: dict[str, Any]) -> _Stream:
        obj = self._response_object(plan, body, "resp_" + self.rng.randbytes(25).hex())
        reasoning_item, message = self._response_items(plan)
        seq = 0

        def event(payload: dict[str, Any]) -> str:
            nonlocal seq
            payload["sequence_number"] = seq
            seq += 1
            return f"event: {payload['type']}\ndata: {_js(payload)}\n\n"

        early = event({"type": "response.created", "response": obj})
        early += event({"type": "response.in_progress", "response": obj})
        first = ""
        index = 0
        items: list[dict[str, Any]] = []
        if reasoning_item is not None:
            first += event(
                {"type": "response.output_item.added", "item": {**reasoning_item}, "output_index": index}
            )
            first += event(
                {"type": "response.output_item.done", "item": reasoning_item, "output_index": index}
            )
            items.append(reasoning_item)
            index += 1
        mid = message["id"]
        first += event(
            {
                "type": "response.output_item.added",
                "item": {**message, "status": "in_progress", "content": []},
                "output_index": index,
            }
        )
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        first += event(
            {
                "type": "response.content_part.added",
                "content_index": 0,
                "item_id": mid,
                "output_index": index,
                "part": part,
            }
        )
        prefix = (
            "event: response.output_text.delta\n"
            'data: {"type":"response.output_text.delta","content_index":0,"delta":'
        )
        middle = f',"item_id":"{mid}","logprobs":[],"obfuscation":"'
        suffix = f'","output_index":{index},"sequence_number":'
        pads, offset = self.pads, self.rng.randrange(len(self.pads))
        tokens = []
        for i, w in enumerate(plan.words):
            tokens.append(
                f"{prefix}{_TOKEN_JSON[w]}{middle}{pads[(offset + i) % len(pads)]}{suffix}{seq}}}\n\n"
            )
            seq += 1
        text = plan.text
        tail = event(
            {
                "type": "response.output_text.done",
                "content_index": 0,
                "item_id": mid,
                "logprobs": [],
                "output_index": index,
                "text": text,
            }
        )
        tail += event(
            {
                "type": "response.content_part.done",
                "content_index": 0,
                "item_id": mid,
                "output_index": index,
                "part": {**part, "text": text},
            }
        )
        tail += event({"type": "response.output_item.done", "item": message, "output_index": index})
        items.append(message)
        self._finish_response(obj, plan, items)
        done_type = "response.incomplete" if plan.truncated else "response.completed"
        tail += event({"type": done_type, "response": obj})
        return _Stream(early, first, tokens, tail)

    # -- OpenAI Embeddings ---------------------------------------------------------

    def _vector(self, dims: int, fmt: str) -> str:
        """One unit vector of ``dims`` floats as JSON text, rendered once per (dims, fmt)."""
        key = (dims, fmt)
        cached = self._vectors.get(key)
        if cached is None:
            vrng = random.Random(f"embedding:{self.seed}:{dims}")
            values = [vrng.gauss(0.0, 1.0) for _ in range(dims)]
            norm = math.sqrt(sum(v * v for v in values)) or 1.0
            values = [v / norm for v in values]
            if fmt == "base64":
                cached = _js(base64.b64encode(struct.pack(f"<{dims}f", *values)).decode())
            else:
                cached = "[\n        " + ",\n        ".join(f"{v:.9f}" for v in values) + "\n      ]"
            if len(self._vectors) >= 16:
                self._vectors.clear()
            self._vectors[key] = cached
        return cached

    def _embeddings_json(self, plan: _Plan, body: dict[str, Any], dims: int) -> bytes:
        fmt = "base64" if body.get("encoding_format") == "base64" else "float"
        raw = body.get("input")
        count = len(raw) if isinstance(raw, list) and raw and not isinstance(raw[0], int) else 1
        placeholder = "\x00vector\x00"
        obj = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": placeholder} for i in range(count)],
            "model": plan.model,
            "usage": {"prompt_tokens": plan.prompt_tokens, "total_tokens": plan.prompt_tokens},
        }
        text = _PRETTY.encode(obj).replace(_js(placeholder), self._vector(dims, fmt))
        return text.encode()

    # -- Anthropic Messages --------------------------------------------------------

    @staticmethod
    def _anthropic_usage(plan: _Plan, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": plan.anthropic_input,
            "cache_creation_input_tokens": plan.cache_creation_tokens,
            "cache_read_input_tokens": plan.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": plan.cache_creation_tokens,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    def _messages_json(self, plan: _Plan) -> bytes:
        body = {
            "id": "msg_01" + self._id(22),
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [{"type": "text", "text": plan.text}],
            "stop_reason": "max_tokens" if plan.truncated else "end_turn",
            "stop_sequence": None,
            "usage": self._anthropic_usage(plan, plan.output_tokens),
        }
        return _js(body).encode()

    def _messages_stream(self, plan: _Plan) -> _Stream:
        pads, offset = _ANTHROPIC_PADS, self.rng.randrange(len(_ANTHROPIC_PADS))

        def event(name: str, data: str, i: int = 0) -> str:
            return f"event: {name}\ndata: {data}{pads[(offset + i) % len(pads)]}\n\n"

        message: dict[str, Any] = {
            "model": plan.model,
            "id": "msg_01" + self._id(22),
            "type": "message",
            "role": "assistant",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._anthropic_usage(plan, 1),
        }
        early = event("message_start", _js({"type": "message_start", "message": message}))
        early += event(
            "content_block_start",
            '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}',
            1,
        )
        early += 'event: ping\ndata: {"type": "ping"}\n\n'
        tokens = [
            event(
                "content_block_delta",
                f'{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{_TOKEN_JSON[w]}}}}}',
                i,
            )
            for i, w in enumerate(plan.words)
        ]
        usage = self._anthropic_usage(plan, plan.output_tokens)
        del usage["cache_creation"], usage["service_tier"]
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens" if plan.truncated else "end_turn", "stop_sequence": None},
            "usage": usage,
        }
        tail = event("content_block_stop", '{"type":"content_block_stop","index":0}', 2)
        tail += event("message_delta", _js(delta), 3)
        tail += event("message_stop", '{"type":"message_stop"}', 4)
        error = _js(
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded"},
                "request_id": "req_" + self._id(24),
            }
        )
        return _Stream(early, "", tokens, tail, f"event: error\ndata: {error}\n\n")

    # -- writing -------------------------------------------------------------------

    async def _write_stream(
        self, request: web.Request, headers: dict[str, str], stream: _Stream, failure: str | None, gz: bool
    ) -> web.StreamResponse:
        """Send ``stream`` with realistic timing; ``cut`` / ``sse_error`` stop it part-way."""
        ttft = self._delay(0.03, 0.3)
        stop_after: int | None = None
        if failure in _STREAM_ONLY:
            stop_after = self.rng.randint(0, max(0, len(stream.tokens) - 1))
        compressor = zlib.compressobj(5, zlib.DEFLATED, 31) if gz else None
        if compressor is not None:
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(status=200, headers=headers)

        async def send(text: str, final: bool = False) -> None:
            data = text.encode()
            if compressor is not None:
                data = compressor.compress(data) + compressor.flush(
                    zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH
                )
            if data:
                await response.write(data)

        try:
            if stream.early:
                # Anthropic and Responses answer with headers and the first events at once.
                await self._sleep(ttft * 0.25)
                await response.prepare(request)
                await send(stream.early)
                await self._sleep(ttft * 0.75)
            else:
                await self._sleep(ttft)
                await response.prepare(request)
            for i, token in enumerate(stream.tokens):
                if i == stop_after:
                    if i == 0 and stream.first:
                        await send(stream.first)
                    break
                if i == 0:
                    await send(stream.first + token)
                else:
                    await self._sleep(self._delay(0.005, 0.03))
                    await send(token)
            else:
                if not stream.tokens:
                    await send(stream.first)
                await send(stream.tail, final=True)
                return response
            if failure == "sse_error":
                await send(stream.error_event, final=True)
                return response
            # "cut": what was written goes out, then the connection closes without the
            # terminating chunk, so the client sees a truncated body.
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:
            pass  # the client hung up mid-stream; nothing more to do
        return response

    # -- the handler ---------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Route by path suffix, then answer, fail or stream as the request and RNG say."""
        path = request.path.rstrip("/")
        endpoint = next((name for suffix, name in _ENDPOINTS if path.endswith(suffix)), None)
        provider = (
            "anthropic" if endpoint == "messages" or (endpoint is None and "anthropic" in path) else "openai"
        )
        gz = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
        if endpoint is None:
            return self._client_error(
                provider, 404, f"Unknown request URL: {request.method} {request.path}", gz
            )
        self.stats.requests[endpoint] += 1
        if endpoint == "models":
            ids = ("gpt-4o-mini", "gpt-4o", "gpt-5-mini", "text-embedding-3-small", "claude-haiku-4-5")
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in ids]
            listing = _PRETTY.encode({"object": "list", "data": data}).encode()
            return self._json_response(200, listing, self._headers("openai", "application/json"), gz)
        if request.method != "POST":
            return self._client_error(
                provider, 405, f"Method {request.method} not allowed on {request.path}", gz
            )

        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(await request.read())
        if not isinstance(body, dict):
            return self._client_error(provider, 400, "We could not parse the JSON body of your request.", gz)
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self._client_error(provider, 400, "model: Field required", gz)
        if endpoint == "messages" and not isinstance(body.get("max_tokens"), int):
            return self._client_error(provider, 400, "max_tokens: Field required", gz)
        dims = 0
        if endpoint == "embeddings":
            default_dims = 3072 if body["model"].startswith("text-embedding-3-large") else 1536
            dims = body.get("dimensions", default_dims)
            if not isinstance(dims, int) or not 1 <= dims <= default_dims:
                return self._client_error(provider, 400, f"dimensions must be within [1, {default_dims}]", gz)
        stream = body.get("stream") is True and endpoint != "embeddings"
        try:
            failure = self._pick_failure(request, provider, stream)
        except ValueError as exc:
            return self._client_error(provider, 400, str(exc), gz)
        if failure is not None:
            self.stats.failures[failure] += 1
            if failure not in _STREAM_ONLY:
                return await self._failure_response(provider, failure, body["model"], gz)

        plan = self._plan(endpoint, body)
        if stream:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            if endpoint == "chat":
                sse = self._chat_stream(plan, include_usage)
            elif endpoint == "completions":
                sse = self._completions_stream(plan, include_usage)
            elif endpoint == "responses":
                sse = self._responses_stream(plan, body)
            else:
                sse = self._messages_stream(plan)
            headers = self._headers(
                provider, "text/event-stream; charset=utf-8", {"Cache-Control": "no-cache"}
            )
            compress = gz and self.gzip_streams and provider == "anthropic"
            return await self._write_stream(request, headers, sse, failure, compress)

        if endpoint == "chat":
            out = self._chat_json(plan)
        elif endpoint == "completions":
            out = self._completions_json(plan)
        elif endpoint == "responses":
            out = self._responses_json(plan, body)
        elif endpoint == "embeddings":
            out = self._embeddings_json(plan, body, dims)
        else:
            out = self._messages_json(plan)
        if endpoint == "embeddings":
            delay = self._delay(0.1, 0.2)
        else:
            delay = (
                0.1 + 0.7 * min(1.0, plan.output_tokens / 400) * self.rng.uniform(0.6, 1.0)
            ) * self.latency_scale
        await self._sleep(delay)
        extra = {"openai-processing-ms": str(round(delay * 1000))} if provider == "openai" else {}
        if endpoint == "embeddings":
            extra["openai-model"] = plan.model
        return self._json_response(200, out, self._headers(provider, "application/json", extra), gz)


def _embedding_tokens(value: Any) -> int:
    """Prompt tokens of an embeddings ``input``: text ≈ len // 4, token arrays count as given."""
    if isinstance(value, str):
        return max(1, len(value) // 4)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return max(1, sum(_embedding_tokens(v) for v in value))
    return 1


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (``q=0`` refuses it)."""
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def create_mock_app(
    *, seed: int = 0, failure_rate: float = 0.05, latency_scale: float = 1.0, gzip_streams: bool = False
) -> web.Application:
    """The mock upstream as an aiohttp application (see the module docstring).

    ``seed`` fixes every random choice; ``failure_rate`` is the probability that a
    request fails; ``latency_scale`` multiplies every delay (0 for none);
    ``gzip_streams`` compresses Anthropic SSE for clients that accept gzip.
    The app's :data:`MOCK_STATS` counts requests and injected failures.
    """
    mock = _Mock(seed, failure_rate, latency_scale, gzip_streams)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[MOCK_STATS] = mock.stats
    app.router.add_route("*", "/{tail:.*}", mock.handle)
    return app


async def start_mock_upstream(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    seed: int = 0,
    failure_rate: float = 0.05,
    latency_scale: float = 1.0,
    gzip_streams: bool = False,
) -> tuple[web.AppRunner, int]:
    """Start the mock on ``host:port`` (0: any free port); returns the runner and the bound port.

    Stop it with ``await runner.cleanup()``; streams still running then get one second
    to finish before they are cancelled.
    """
    app = create_mock_app(
        seed=seed, failure_rate=failure_rate, latency_scale=latency_scale, gzip_streams=gzip_streams
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound: int = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound
