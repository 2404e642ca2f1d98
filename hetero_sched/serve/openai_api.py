"""OpenAI's completions and chat wire format: validate a request body, build the replies.

Pure functions, no I/O: ``parse_request`` turns a raw body into an :class:`ApiRequest` or raises
:class:`ApiError` (status, OpenAI-style ``{"error": {message, type, param, code}}`` body); the
builders make the JSON objects of a non-streamed reply and of each SSE chunk.

Accepted and honoured: ``model`` (missing: the default model), ``prompt`` (a string, or token
ids, or a one-element list of either), ``messages`` (string content or text parts),
``max_tokens`` / ``max_completion_tokens``, ``min_tokens``, ``ignore_eos``, ``stream``,
``stream_options.include_usage``, ``n`` = 1. Accepted and ignored, since output is greedy or
placeholder text: sampling parameters (``temperature``, ``top_p``, ``seed``, ...) and unknown
fields (as vLLM does). Refused with 400: ``n`` > 1, ``stop`` sequences, ``echo``, ``logprobs``,
several prompts in one request, an empty prompt, and a prompt plus ``max_tokens`` beyond the
model's context.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional

from hetero_sched.serve.servecore import FinalEvent, FinishReason, ModelCard
from hetero_sched.serve.tokenizer import VOCAB_SIZE, ByteTokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for ``/v1/completions``; chat defaults to the rest of the context (as vLLM)."""


class Endpoint(str, Enum):
    """The two generation endpoints."""

    COMPLETIONS = "completions"
    CHAT = "chat"


class ApiError(Exception):
    """An error reply: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ApiRequest:
    """A validated generation request."""

    endpoint: Endpoint
    model_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool


def _int_field(body: Mapping[str, Any], name: str, minimum: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name, "invalid_type")
    if value < minimum:
        raise bad(f"'{name}' must be >= {minimum}, got {value}", name)
    return value


def _bool_field(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be a boolean", name, "invalid_type")
    return value


def _token_ids(value: list[Any], param: str) -> tuple[int, ...]:
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < VOCAB_SIZE for t in value):
        raise bad(f"'{param}' token ids must be integers in [0, {VOCAB_SIZE})", param)
    return tuple(value)


def _completion_prompt(body: Mapping[str, Any], tokenizer: ByteTokenizer) -> tuple[int, ...]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                   # a batch of one
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return _token_ids(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("several prompts in one request are not supported: send one request per prompt", "prompt")
    raise bad("'prompt' must be a string or a list of token ids", "prompt", "invalid_type" if prompt is not None else None)


def _message_text(message: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad(f"'{param}' must be an object with a string 'role'", param, "invalid_type")
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"'{param}.content': only text parts are supported", f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise bad(f"'{param}.content' must be a string or a list of text parts", f"{param}.content", "invalid_type")
    return {"role": message["role"], "content": content}


def _chat_prompt(body: Mapping[str, Any], tokenizer: ByteTokenizer) -> tuple[int, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    return tokenizer.encode(tokenizer.render_chat([_message_text(m, i) for i, m in enumerate(messages)]))


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = _int_field(body, "n", 1)
    if n is not None and n != 1:
        raise bad("'n' > 1 is not supported", "n")
    if body.get("stop") not in (None, "", []):
        raise bad("stop sequences are not supported (outputs run to max_tokens)", "stop", "unsupported_parameter")
    for name in ("echo", "logprobs", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise bad(f"'{name}' is not supported", name, "unsupported_parameter")


def parse_request(endpoint: Endpoint, raw: bytes, models: Mapping[str, ModelCard],
                  tokenizer: ByteTokenizer) -> ApiRequest:
    """Validate a request body; raises :class:`ApiError` (400) naming the first problem."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    model_id = body.get("model")
    if model_id is None:
        model_id = next(iter(models))
    if not isinstance(model_id, str) or model_id not in models:
        raise bad(f"the model {json.dumps(model_id)[:80]} does not exist; served: {', '.join(models)}",
                  "model", "model_not_found")
    card = models[model_id]
    _refuse_unsupported(body)
    stream = _bool_field(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool_field(options or {}, "include_usage", False)
    prompt = (_chat_prompt if endpoint is Endpoint.CHAT else _completion_prompt)(body, tokenizer)
    if not prompt:
        raise bad("the prompt is empty", "messages" if endpoint is Endpoint.CHAT else "prompt")
    max_tokens = _int_field(body, "max_completion_tokens", 1) if endpoint is Endpoint.CHAT else None
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1)
    room = card.max_model_len - len(prompt)
    if max_tokens is None and room >= 1:
        max_tokens = min(room, COMPLETIONS_DEFAULT_MAX_TOKENS) if endpoint is Endpoint.COMPLETIONS else room
    wanted = len(prompt) + (max_tokens or 1)
    if wanted > card.max_model_len:
        raise bad(f"This model's maximum context length is {card.max_model_len} tokens. However, you requested "
                  f"{wanted} tokens ({len(prompt)} in the prompt, {max_tokens or 1} for the completion).",
                  "messages" if endpoint is Endpoint.CHAT else "prompt", "context_length_exceeded")
    assert max_tokens is not None
    min_tokens = _int_field(body, "min_tokens", 0) or 0
    if min_tokens > max_tokens:
        raise bad(f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})", "min_tokens")
    return ApiRequest(endpoint, model_id, prompt, max_tokens, min_tokens, _bool_field(body, "ignore_eos", True),
                      stream, include_usage)


def usage(final: FinalEvent) -> dict[str, Any]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens}}


def response_id(endpoint: Endpoint, request_id: str) -> str:
    """``cmpl-...`` or ``chatcmpl-...``."""
    return f"{'chatcmpl' if endpoint is Endpoint.CHAT else 'cmpl'}-{request_id}"


def full_response(req: ApiRequest, request_id: str, created: int, text: str, final: FinalEvent) -> dict[str, Any]:
    """The body of a non-streamed reply."""
    if req.endpoint is Endpoint.CHAT:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                  "finish_reason": final.finish_reason.value}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": final.finish_reason.value}
        obj = "text_completion"
    return {"id": response_id(req.endpoint, request_id), "object": obj, "created": created, "model": req.model_id,
            "choices": [choice], "usage": usage(final)}


def stream_chunk(req: ApiRequest, request_id: str, created: int, text: Optional[str],
                 finish: Optional[FinishReason] = None, *, first: bool = False) -> dict[str, Any]:
    """One SSE chunk with ``text`` (chat: the first chunk also carries the role) or the finish reason."""
    reason = finish.value if finish is not None else None
    if req.endpoint is Endpoint.CHAT:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    chunk: dict[str, Any] = {"id": response_id(req.endpoint, request_id), "object": obj, "created": created,
                             "model": req.model_id, "choices": [choice]}
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(req: ApiRequest, request_id: str, created: int, final: FinalEvent) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": response_id(req.endpoint, request_id),
            "object": "chat.completion.chunk" if req.endpoint is Endpoint.CHAT else "text_completion",
            "created": created, "model": req.model_id, "choices": [], "usage": usage(final)}


def retry_after_header(retry_after_s: float) -> str:
    """``Retry-After`` in whole seconds (the header allows no fractions), at least 1."""
    return str(max(1, math.ceil(retry_after_s))) if math.isfinite(retry_after_s) else "60"


def now_created() -> int:
    """OpenAI's ``created``: Unix seconds."""
    return int(time.time())
