"""Request bodies (pydantic) and OpenAI-shaped errors.

Each model validates types and ranges on construction, so a client's mistake
is a 400 that names the parameter, never a 5xx.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dist_infer.engine.sampling import MAX_LOGPROBS


class APIError(Exception):
    """An error with OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None,
                 headers: dict | None = None):
        # A message may quote the client's text: lone surrogates in it would fail the UTF-8 response.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.code = code if code is not None else status
        self.kind = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def check_unicode(value, where: str = "body") -> None:
    """JSON lets a string hold a lone surrogate (\\ud800), which is not Unicode text: it can be
    neither tokenized nor sent back as UTF-8. Refuse it (400), naming where it is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate, which is not valid Unicode; send UTF-8 "
                             "text (escape a character outside the BMP as a surrogate pair)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, where)
            check_unicode(item, f"{where}.{key}" if isinstance(key, str) and key.isascii() else where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_unicode(item, f"{where}[{index}]")


class RequestBody(BaseModel):
    """A request body: unknown fields ignored, every string valid Unicode."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        check_unicode(data)
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(RequestBody):
    """What completions and chat share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off (vLLM uses -1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        if self.n != 1:
            raise ValueError("n > 1 is not supported by this server; send n separate requests")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing (lm-eval)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    # Beam search, an extension field (as vLLM's use_beam_search + best_of were): the best of num_beams beams,
    # equal to transformers' generate(num_beams=...); deterministic, so temperature defaults to 0 with it.
    num_beams: int = Field(1, ge=1, le=10)
    length_penalty: float = Field(1.0, allow_inf_nan=False)
    early_stopping: bool | Literal["never"] = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _echo(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only meaningful with echo: true (scoring a prompt)")
        return self

    @model_validator(mode="after")
    def _beam_search(self):
        if self.num_beams == 1:
            return self
        asked_temperature = "temperature" in self.model_fields_set and self.temperature > 0  # default 1 is fine
        sampled = [name for name, on in (("temperature", asked_temperature), ("top_p", self.top_p < 1),
                                         ("top_k", self.top_k > 0)) if on]
        unsupported = [name for name, on in (("stream", self.stream), ("stop", bool(self.stop)),
                                             ("logprobs", self.logprobs is not None), ("echo", self.echo)) if on]
        if sampled:
            raise ValueError(f"num_beams > 1 is deterministic beam search: drop {', '.join(sampled)} "
                             "(or set temperature to 0)")
        if unsupported:
            raise ValueError(f"num_beams > 1 does not support {', '.join(unsupported)} (the answer exists only once "
                             "the search ends); drop it or use num_beams 1")
        return self

    def beam_fields(self) -> dict:
        """SamplingParams' beam-search fields (greedy rows: temperature 0)."""
        if self.num_beams == 1:
            return {}
        return dict(temperature=0.0, num_beams=self.num_beams, length_penalty=self.length_penalty,
                    early_stopping=self.early_stopping)

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: only text parts are supported
            if any(part.get("type") != "text" for part in self.content):
                raise ValueError("only text content parts are supported")
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TritonGenerateRequest(RequestBody):
    """Triton's generate extension, as its tensorrtllm backend takes it."""

    text_input: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)
    parameters: dict = Field(default_factory=dict)
    stream: bool = False


class UpdateWeightsRequest(RequestBody):
    """POST /admin/update_weights (serve --enable-admin): the engine directory whose weights every
    rank takes, a `dist-infer refit` of the served engine (or the served engine itself, refitted in
    place). Unknown fields are refused: a typo must not look like an update of nothing."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        unknown = sorted(set(data) - {"engine"}) if isinstance(data, dict) else []
        if unknown:
            raise ValueError(f"unknown field {', '.join(map(repr, unknown))}: the body is {{\"engine\": \"DIR\"}}, "
                             "a `dist-infer refit` engine directory")
        return data
