"""Seeded fault injection for the mirror: the failures a long download meets on a real network."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: Every fault kind the mirror can inject on a file body request.
FAULT_KINDS: tuple[str, ...] = (
    "reset",  # connection reset mid-body
    "http500",
    "http502",
    "http503",
    "http429",  # 429 with Retry-After and RateLimit headers
    "trickle",  # slow body
    "stall",  # the body stops mid-way for ``stall_seconds`` (a read that hangs)
    "cut",  # body cut short (Content-Length promises more)
    "corrupt",  # wrong bytes in the body
    "cdn_fail",  # the CDN listener fails (503) after the redirect
    "cdn_expired",  # the CDN answers 403 as for an expired signed URL
)


@dataclass
class FaultConfig:
    """Inject a fault into about ``rate`` of file requests, chosen by a seeded RNG.

    ``kinds`` restricts the kinds used. ``max_per_path`` bounds the faults one file meets, so
    a run with faults on always finishes with a finite retry budget.
    """

    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = FAULT_KINDS
    max_per_path: int = 3
    only: tuple[str, ...] = ()  # when set, only paths containing one of these strings get faults
    retry_after: float = 0.2
    #: False: a 429 carries only the Hub's ``RateLimit: ...;t=N`` header, no ``Retry-After``.
    retry_after_header: bool = True
    trickle_delay: float = 0.02
    stall_seconds: float = 5.0
    _rng: random.Random = field(init=False, repr=False)
    _per_path: dict[str, int] = field(init=False, default_factory=dict, repr=False)
    injected: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("fault rate must be in [0, 1]")
        self._rng = random.Random(self.seed)

    @classmethod
    def parse(cls, spec: str | None, seed: int = 0) -> FaultConfig | None:
        """``"0.3"`` or ``"0.3:reset,http503"`` -> FaultConfig; None/empty -> no faults."""
        if not spec:
            return None
        rate_s, _, kinds_s = spec.partition(":")
        kinds = tuple(k.strip() for k in kinds_s.split(",") if k.strip()) or FAULT_KINDS
        return cls(rate=float(rate_s), seed=seed, kinds=kinds)

    def draw(self, path: str, *, cdn: bool, body: bool = True) -> str | None:
        """The fault for this request, or None. The CDN listener may get every kind; the Hub
        listener no ``cdn_*`` kind; a request answered without a body (a redirect) only statuses."""
        if self.rate <= 0 or self._per_path.get(path, 0) >= self.max_per_path:
            return None
        if self.only and not any(s in path for s in self.only):
            return None
        if self._rng.random() >= self.rate:
            return None
        kinds = [k for k in self.kinds if (cdn or not k.startswith("cdn_")) and (body or k.startswith("http"))]
        if not kinds:
            return None
        kind = self._rng.choice(kinds)
        self._per_path[path] = self._per_path.get(path, 0) + 1
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return kind
