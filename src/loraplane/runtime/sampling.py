"""SamplingParams: how one request decodes; checked on arrival so bad values are a 400
(InvalidRequest)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplane.runtime.outputs import InvalidRequest

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k}")
        # torch.Generator.manual_seed's range; outside it the engine step itself would fail.
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if len(self.stop) > 16 or any(not s for s in self.stop):
            raise InvalidRequest("stop takes at most 16 non-empty strings")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE sampling is greedy in all but name, and 1/T overflows fp32.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1
