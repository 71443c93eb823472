"""What a generation is asked for and what it gives back: the configuration, the streamed
`TokenEvent`s, the final `GenerationResult`, the `Generation` handle, and the stop-string matcher.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from workbench.engine.sampler import SamplerConfig
from workbench.errors import UserError
from workbench.observe.tracing import NO_TRACE, GenerationTrace

# TokenEvent.id of the last event when it only releases held-back text (no new token).
FLUSH_ID = -1


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    logprobs: int = 0  # top-N log-probabilities reported at each generated position

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UserError(
                "user.bad_max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}"
            )
        if not 0 <= self.logprobs <= 20:
            raise UserError(
                "user.bad_logprobs", f"logprobs must be in [0, 20], got {self.logprobs}"
            )
        if any(not s for s in self.stop):
            raise UserError("user.bad_stop", "stop strings must not be empty")
        _ = self.sampler  # builds a SamplerConfig, which validates the sampling fields

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            repeat_last_n=self.repeat_last_n,
            seed=self.seed,
        )


@dataclass(frozen=True)
class TopLogprob:
    id: int
    piece: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it releases; a last event with id FLUSH_ID may follow."""

    index: int  # 0 for the first generated token
    id: int
    text: str  # text released with this token (held back while it may start a stop string)
    logprob: float  # under the model, before sampling transforms; NaN if drawn on the device
    top_logprobs: tuple[TopLogprob, ...]  # empty unless GenerationConfig.logprobs > 0
    elapsed_s: float  # since generate() started
    step_s: float  # forward pass and sampling for this token


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # start to first generated token
    decode_s: float = 0.0  # after the first token to the last
    total_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.generated_tokens - 1  # the first token comes from the prefill
        return n / self.decode_s if n > 0 and self.decode_s else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": self.prefill_s,
            "ttft_s": self.ttft_s,
            "decode_s": self.decode_s,
            "total_s": self.total_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
        }


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOG token or stop string), "length", "cancelled"
    timings: Timings
    logprobs: list[tuple[float, tuple[TopLogprob, ...]]] = field(default_factory=list)


class Generation:
    """An iterable of TokenEvents; `.result` is set once iteration ends."""

    def __init__(self, events: Iterator[TokenEvent], prompt_ids: list[int]) -> None:
        self._events = events
        self.prompt_token_ids = prompt_ids
        self.result: GenerationResult | None = None
        self.cancelled = False
        self.request_id = ""
        self.deadline: float | None = None  # time.monotonic() past which prefill stops
        self.queued_s = 0.0  # waited before it started (counted in the time-to-first-token)
        self.config: GenerationConfig | None = None  # set by the engine that made it
        self.trace: GenerationTrace = NO_TRACE  # its spans (see workbench.observe.tracing)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def cancel(self) -> None:
        """Stop after the token or prefill chunk in progress; the finish reason is "cancelled".
        Thread-safe (it sets a flag the generating thread reads)."""
        self.cancelled = True

    def stopping(self) -> bool:
        """Cancelled, or past its deadline."""
        return self.cancelled or (self.deadline is not None and time.monotonic() >= self.deadline)

    def run(self) -> GenerationResult:
        """Consume every event and return the result."""
        for _ in self._events:
            pass
        assert self.result is not None
        return self.result


class StopMatcher:
    """Releases streamed text while holding back any tail that may begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""  # released text
        self._pending = ""
        self.matched = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to release now, whether a stop string matched)."""
        buf = self._pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched = True
            return self._release(buf[: min(hits)], ""), True
        hold = max((_overlap(buf, s) for s in self.stops), default=0)
        return self._release(buf[: len(buf) - hold], buf[len(buf) - hold :]), False

    def flush(self, piece: str = "") -> str:
        """End of generation: release what was held back (it matched no stop string)."""
        if self.matched:
            return ""
        released, _ = self.feed(piece)
        return released + self._release(self._pending, "")

    def _release(self, out: str, pending: str) -> str:
        self.text += out
        self._pending = pending
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
