"""Provider adapters: one per API shape, behind the :class:`Shape` protocol, in one dict.

This package owns the meaning of provider payloads: which endpoint a request is for
(:func:`detect`), what a request asks for, what a response or stream reports. It is
pure (standard library, :mod:`sidecar.model` and :mod:`sidecar.sse` only): no aiohttp,
no asyncio, no I/O, no clock. The proxy feeds it bytes and reads the results.

Shapes (:data:`SHAPES`, keyed by ``(provider, operation)``):

============  =================  =========================  ==============================
provider      operation          path suffix                stream ends with
============  =================  =========================  ==============================
openai        chat               ``/chat/completions``      ``data: [DONE]``
openai        text_completion    ``/completions``           ``data: [DONE]``
openai        responses          ``/responses``             ``response.completed`` /
                                                            ``.incomplete`` / ``.failed``
openai        embeddings         ``/embeddings``            (does not stream)
anthropic     messages           ``/v1/messages``           ``message_stop``
============  =================  =========================  ==============================

Usage table: provider field → normalised token type (see :data:`sidecar.model.TOKEN_TYPES`).
A field that is absent stays ``None`` (not reported); a reported ``0`` is ``0``.

==============  ==========================================  =========================================
token type      OpenAI chat / completions (embeddings)      OpenAI Responses
==============  ==========================================  =========================================
input           ``prompt_tokens`` (embeddings: same)        ``input_tokens``
cached_input    ``prompt_tokens_details.cached_tokens``     ``input_tokens_details.cached_tokens``
cache_write     not reported                                not reported
cache_write_1h  not reported                                not reported
output          ``completion_tokens`` (embeddings: none)    ``output_tokens``
reasoning       ``completion_tokens_details``               ``output_tokens_details``
                ``.reasoning_tokens``                       ``.reasoning_tokens``
==============  ==========================================  =========================================

==============  ======================================================================
token type      Anthropic Messages
==============  ======================================================================
input           ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``
                (Anthropic's ``input_tokens`` excludes both cache counts)
cached_input    ``cache_read_input_tokens``
cache_write     ``cache_creation_input_tokens``
cache_write_1h  ``cache_creation.ephemeral_1h_input_tokens``
output          ``output_tokens`` (stream: the last ``message_delta.usage`` only)
reasoning       not reported (thinking is inside ``output_tokens``)
==============  ======================================================================

Where usage is found: OpenAI chat/completions JSON ``usage``; their streams, the chunk
whose ``usage`` is an object (the final ``"choices": []`` chunk, sent only with
``stream_options.include_usage``; ``"usage": null`` elsewhere means nothing).
Responses: ``usage`` of the response object, in a stream from the terminal event
(``response.created`` has ``usage: null`` and the *requested* ``service_tier``).
Anthropic: ``usage``; in a stream ``message_start.message.usage`` then the cumulative
``message_delta.usage`` (last value of each field wins, never summed).
Cached tokens are part of ``input`` and reasoning tokens part of ``output``
everywhere, so no token is counted twice.

Other fields: ``model`` and ``id`` of the response (stream: the chunks, the terminal
Responses event, Anthropic's ``message_start.message``); finish reasons from
``choices[].finish_reason`` (by choice index), Anthropic ``stop_reason``, and for
Responses the ``incomplete_details.reason`` or else the ``status``; service tier from
``service_tier`` (Anthropic: ``usage.service_tier``).

Checklist for adding a provider shape:

1. Record real payloads (JSON, SSE, an error) into the shared fixtures with a meta file.
2. Write a module here with a class that satisfies :class:`Shape` (``provider``,
   ``operation``, ``path_suffix`` and the five methods; never raise on bad input) and a
   :class:`StreamObserver` subclass whose ``_observe`` parses only the events it needs
   (content events, once content was seen, are told apart by their bytes and kept
   unparsed) and whose ``_text_of`` gives the text of a kept event, read lazily.
3. Add its rows to the usage table above, including what is *not* reported.
4. Decide and document which stream events count as generated content.
5. Register the instance in :data:`SHAPES`; check :func:`detect` does not shadow
   another shape's suffix.
6. Add table rows to ``tests/test_providers.py`` with the exact figures from the
   fixtures, and run the chunk-boundary tests over the new streams.
7. Add prices for its models to the price table.
"""

from __future__ import annotations

from sidecar.providers.anthropic import MESSAGES
from sidecar.providers.base import (
    MAX_OUTPUT_CHARS,
    PromptText,
    RequestInfo,
    ResponseInfo,
    Shape,
    StreamObserver,
)
from sidecar.providers.openai import CHAT, EMBEDDINGS, RESPONSES, TEXT_COMPLETION

__all__ = [
    "MAX_OUTPUT_CHARS",
    "PROVIDERS",
    "SHAPES",
    "PromptText",
    "RequestInfo",
    "ResponseInfo",
    "Shape",
    "StreamObserver",
    "detect",
]

#: Every known shape, keyed by ``(provider, operation)``.
SHAPES: dict[tuple[str, str], Shape] = {
    (shape.provider, shape.operation): shape
    for shape in (CHAT, TEXT_COMPLETION, RESPONSES, EMBEDDINGS, MESSAGES)
}

#: The provider names shapes are registered under.
PROVIDERS: frozenset[str] = frozenset(provider for provider, _ in SHAPES)

# Longest suffix first, so that "/chat/completions" wins over "/completions".
_BY_SUFFIX: tuple[Shape, ...] = tuple(sorted(SHAPES.values(), key=lambda s: len(s.path_suffix), reverse=True))


def detect(path: str, provider: str | None) -> Shape | None:
    """The shape of a request path, by suffix, or None when no shape matches.

    The query string is ignored and any prefix is allowed (``/v1/chat/completions``,
    Azure's ``/openai/deployments/x/chat/completions``). ``provider`` limits the match
    to that provider's shapes; None allows any. Only meaningful for ``POST`` requests
    (a ``GET .../chat/completions`` lists stored completions).
    """
    path = path.partition("?")[0].partition("#")[0].rstrip("/")
    if not path.startswith("/"):
        path = "/" + path
    for shape in _BY_SUFFIX:
        if (provider is None or shape.provider == provider) and path.endswith(shape.path_suffix):
            return shape
    return None
