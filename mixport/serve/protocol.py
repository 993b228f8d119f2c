"""Request bodies of /v1/completions and /v1/chat/completions, and their mapping to a Job.

The fields users send (OpenAI's, plus vLLM's ``top_k`` / ``repetition_penalty`` extensions) are
read; unknown fields are ignored, as OpenAI's server does. A value mixport cannot honour is
refused with a 400 that names it (``n`` > 1, ``echo``, non-zero presence / frequency penalties,
``logit_bias``, chat ``top_logprobs`` > 0), never silently dropped.

Defaults follow OpenAI: ``temperature`` 1.0 (sampling; send 0 for greedy, as ``mixport run``
does by default), ``top_p`` 1, ``max_tokens`` 16 for completions and "up to the context" for
chat. With ``temperature`` 0, ``top_p`` / ``top_k`` / ``seed`` are accepted and have no effect
(OpenAI's clients send them together), where ``mixport run`` would refuse them."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mixport.errors import RuntimeFailure
from mixport.runtime.sampling import SamplingConfig
from mixport.runtime.scheduler import Job
from mixport.serve.errors import ApiError, bad_request

MAX_STOPS = 4  # as OpenAI
MAX_LOGPROBS = 5  # completions' logprobs: 0..5 (only the chosen token's logprob is returned)
SEED_MASK = 2**64 - 1  # OpenAI's seeds are signed 64-bit; the sampler's are unsigned: same bits


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CommonRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # extension (vLLM): -1 or 0 is off
    repetition_penalty: float | None = Field(default=None, gt=0)  # extension (vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """400 for values mixport would otherwise ignore silently."""
        if self.n != 1:
            raise bad_request(f"n={self.n} is not supported: one choice per request (n=1)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value:
                raise bad_request(f"{name}={value} is not supported (0 only); repetition_penalty "
                                  "(an extension, > 1 penalizes) is", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")

    def sampling(self) -> SamplingConfig:
        """The sampler's settings; with temperature 0 the sampling-only fields are dropped."""
        temperature = 1.0 if self.temperature is None else self.temperature
        penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        try:
            if temperature == 0:
                return SamplingConfig(temperature=0.0, repetition_penalty=penalty)
            top_k = max(self.top_k or 0, 0)
            seed = None if self.seed is None else self.seed & SEED_MASK
            top_p = 1.0 if self.top_p is None else self.top_p
            return SamplingConfig(temperature, top_k, top_p, penalty, seed)
        except RuntimeFailure as exc:  # the sampler's own checks (kept as the last word)
            raise bad_request(str(exc)) from None

    def job(self, prompt: list[int], max_new_tokens: int, logprobs: bool) -> Job:
        return Job(prompt=prompt, max_new_tokens=max_new_tokens, sampling=self.sampling(), stop=self.stops(),
                   logprobs=logprobs)


class CompletionRequest(CommonRequest):
    prompt: Any = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise bad_request("echo=true is not supported", "echo")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of={self.best_of} is not supported (1 only)", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")

    def one_prompt(self) -> str | list[int]:
        """The prompt: a string or a list of token ids (a one-element list of either is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise bad_request("empty prompt: give some text or token ids", "prompt")
            return prompt
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not prompt:
                raise bad_request("empty prompt: give some text or token ids", "prompt")
            return prompt
        if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request(f"one prompt per request (n=1), got a list of {len(prompt)} prompts", "prompt")
        if prompt is None:
            raise bad_request("prompt is required", "prompt")
        raise bad_request("prompt must be a string or a list of token ids", "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):  # content parts: text only
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise bad_request("only text content parts are supported", "messages")
            content = "".join(part["text"] for part in content)
        out = {"role": self.role, "content": content or ""}
        if self.name:
            out["name"] = self.name
        return out


class ChatRequest(CommonRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs:
            raise bad_request(f"top_logprobs={self.top_logprobs} is not supported: logprobs=true returns the "
                              "chosen token's logprob only (top_logprobs 0)", "top_logprobs")
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")

    def message_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def max_new_tokens(requested: int | None, prompt_len: int, context: int, default: int | None) -> int:
    """max_tokens (or the endpoint's default; None: up to the context), cut at the context."""
    room = context - prompt_len
    if room < 1:
        raise bad_request(f"the prompt is {prompt_len} tokens; this model's context is {context} tokens "
                          "(the prompt must be shorter)", "prompt", code="context_length_exceeded")
    wanted = requested if requested is not None else default
    return room if wanted is None else min(wanted, room)


def finite_or_none(value: float | None) -> float | None:
    """JSON has no nan / inf: such a logprob is sent as null."""
    return value if value is not None and math.isfinite(value) else None


Endpoint = Literal["completions", "chat"]


def refuse(exc: RuntimeFailure, param: str | None = None) -> ApiError:
    """A runtime refusal (bad ids, no tokenizer, no chat template...) as a 400 with its message."""
    return bad_request(str(exc), param)
