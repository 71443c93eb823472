"""Request and response bodies of the HTTP API, shaped like OpenAI's (the subset the engine serves).

Sampler fields are validated here (ranges as the engine's sampler accepts them), so a bad value
is a 400 before the request is queued. Types are strict: ``"5"`` is not an integer and ``1`` is
not a boolean. ``top_k``, ``min_p`` and ``repeat_penalty`` are extensions; their defaults switch
them off, so an OpenAI client gets OpenAI's sampling (temperature, top_p).

OpenAI fields the engine does not serve (tools, response_format, logprobs, n > 1, ...) are
refused with a 400 naming the field when they ask for something (`UNSUPPORTED`); a client is
never silently given less than it asked for. Other unknown fields are ignored, as
OpenAI-compatible servers usually do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_SEED = 2**63 - 1  # OpenAI's seed is a signed 64-bit integer; the sampler takes >= 0


def _given(v: Any) -> bool:
    """A field that asks for something: not null, false, zero, empty or "none"."""
    return v not in (None, False, 0, "", [], {}, "none")


def _not_text(v: Any) -> bool:
    return _given(v) and v != {"type": "text"}


# Fields of OpenAI's API that the engine does not serve -> when a value asks for them.
UNSUPPORTED: dict[str, Any] = {
    "tools": _given,
    "tool_choice": _given,
    "functions": _given,
    "function_call": _given,
    "parallel_tool_calls": _given,
    "response_format": _not_text,
    "logprobs": _given,
    "top_logprobs": _given,
    "logit_bias": _given,
    "presence_penalty": _given,
    "frequency_penalty": _given,
    "best_of": lambda v: _given(v) and v != 1,
    "echo": _given,
    "suffix": _given,
    "audio": _given,
    "modalities": lambda v: _given(v) and v != ["text"],
    "prediction": _given,
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, asks in UNSUPPORTED.items():
                if name in data and asks(data[name]):
                    raise PydanticCustomError(
                        "unsupported_field",
                        "{field} is not supported by this server",
                        {"field": name},
                    )
        return data

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    user: str | None = None  # accepted and not stored
    # Extensions (llama.cpp's names).
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] = Field(
        description="one prompt: text, a list of token ids, or a list holding one text"
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            if len(v) != 1:
                raise ValueError("only one prompt per request")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v  # type: ignore[return-value]

    def token_limit(self) -> int | None:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "workbench"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Problem(BaseModel):
    """RFC 7807 problem details, plus the request id and the workbench error code."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    request_id: str
    trace_id: str | None = None  # the OpenTelemetry trace of the request (32 hex digits)
    code: str | None = None
    errors: list[dict[str, Any]] | None = None
    error: OpenAIError | None = None  # the same, as OpenAI clients read it


class OpenAIError(BaseModel):
    """OpenAI's error object (``{"error": {...}}``), which the official clients read."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


Problem.model_rebuild()
_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
