"""The ``openai`` provider: OpenAI, or any OpenAI-compatible server, through
the official ``openai`` SDK (async client).

Two APIs (``api=``, ``--openai-api``), each mapped both ways in its own
module:

* ``chat`` (default): Chat Completions streaming with
  ``stream_options={"include_usage": true}``
  (:mod:`wsserver.providers.openai_chat`: content parts, tool calls by
  ``index``, ``refusal``, ``reasoning_effort``, ``response_format``, and the
  ``reasoning_content`` of OpenAI-compatible servers).
* ``responses``: the Responses API (``POST /responses``, ``store: false``;
  :mod:`wsserver.providers.openai_responses`: input items, function calls,
  reasoning summaries and their encrypted content, ``text.format``).

``base_url`` is any OpenAI-compatible endpoint and must include the version
path (``http://127.0.0.1:11434/v1``): the SDK posts to
``{base_url}/chat/completions`` and ``{base_url}/responses``. Local servers
(Ollama, vLLM, llama.cpp) that do not check keys get a placeholder key.
``images=False`` (``--no-openai-images``) declares a text-only model: an image
part is then refused before any request (``provider_error``) instead of
being sent to a server that may fail on it in its own way.

Parameters: ``max_tokens`` is sent as ``max_completion_tokens`` to
api.openai.com (its reasoning models reject ``max_tokens``) and as
``max_tokens`` to other base URLs, which is what OpenAI-compatible servers
understand (``max_tokens_param=`` overrides); ``max_output_tokens`` with the
Responses API. ``temperature``, ``top_p`` and ``stop`` are passed through when
set; the upstream rejects values it does not support (a safe
``provider_error``). ``params.provider_options`` is merged into the request
body last (objects key by key, anything else replaced), so it can set any
field the mapping does not (``parallel_tool_calls``, ``service_tier``…);
``stream`` stays true.

Usage: ``prompt_tokens``/``completion_tokens`` (``input_tokens``/
``output_tokens`` with the Responses API) as reported at the end of the
stream; a stream that fails before that ends with the server's estimate.

Retries, errors and closing the upstream: :mod:`wsserver.providers.upstream`.
The SDK is imported when the provider is constructed (only when it is
configured), never at ``import wsserver``.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from .base import GenerationRequest
from .mapping import sdk_arguments
from .openai_chat import FINISH_REASONS, ChatReader, chat_body
from .openai_responses import ResponsesReader, responses_body
from .upstream import HTTPProvider, Reader, RetryPolicy

__all__ = ["DEFAULT_BASE_URL", "FINISH_REASONS", "OpenAIProvider", "PLACEHOLDER_KEY"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Sent when a base URL is configured without a key (local servers ignore it).
PLACEHOLDER_KEY = "no-key-configured"


class OpenAIProvider(HTTPProvider):
    """OpenAI Chat Completions or Responses streaming (see the module docstring)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        default_model: str = "gpt-5-mini",
        api: Literal["chat", "responses"] = "chat",
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        max_tokens_param: str | None = None,
        images: bool = True,
        name: str = "openai",
    ) -> None:
        super().__init__(retry=retry)
        if api not in ("chat", "responses"):
            raise ValueError(f"api must be 'chat' or 'responses', not {api!r}")
        import httpx2
        import openai

        self._sdk = openai
        self.name = self.label = name
        self.default_model = default_model
        self.api = api
        self.images = images
        self.base_url = base_url or DEFAULT_BASE_URL
        official = (urlsplit(self.base_url).hostname or "").endswith("api.openai.com")
        self.max_tokens_param = max_tokens_param or (
            "max_completion_tokens" if official else "max_tokens"
        )
        self._client = openai.AsyncOpenAI(
            api_key=api_key or PLACEHOLDER_KEY,
            base_url=self.base_url,
            max_retries=0,  # wsserver retries itself, only before the first token
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    async def _open(self, request: GenerationRequest) -> Any:
        if self.api == "responses":
            body = responses_body(request, label=self.label, images=self.images)
            create = self._client.responses.create
        else:
            body = chat_body(
                request, label=self.label, max_tokens_param=self.max_tokens_param, images=self.images
            )
            create = self._client.chat.completions.create
        return await create(**sdk_arguments(create, body))

    def _reader(self) -> Reader:
        return ResponsesReader() if self.api == "responses" else ChatReader()
