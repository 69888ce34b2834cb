"""Privacy events: one immutable record per mechanism that touched sensitive data.

Compatibility contract (as in dp-accounting's `dp_event.py`): the `mechanism` names
and the fields below are relied on by other tools reading `manifest.yaml`. Fields are
never removed and their meanings never change; new fields are optional.

Every noise multiplier is relative to the mechanism's L2 sensitivity (noise std =
noise_multiplier * sensitivity), so an event is fully described without the data.
Adjacency is add/remove one image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from ..errors import BadInput

SCHEMA_VERSION = 1


def _check_positive(name: str, value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise BadInput(f"{what}: {name}={value!r} is not allowed; it must be a finite number > 0")


@dataclass(frozen=True)
class PrivacyEvent:
    """Base: `stage` names the pipeline stage that ran the mechanism."""

    mechanism: ClassVar[str] = ""
    stage: str

    def __post_init__(self) -> None:
        # One validation for every event type: the fields each one has, by what they mean.
        what = f"{self.mechanism} event"
        for name in ("noise_multiplier", "epsilon0"):
            if hasattr(self, name):
                _check_positive(name, getattr(self, name), what)
        for name in ("steps", "shards"):
            if hasattr(self, name):
                _check_count(name, getattr(self, name), what)
        self._check_sample_rate(what)

    def _check_sample_rate(self, what: str) -> None:
        """Events without a `sample_rate` field have nothing to check."""

    def to_dict(self) -> dict:
        return {"stage": self.stage, "mechanism": self.mechanism,
                **{k: v for k, v in asdict(self).items() if k != "stage"}}

    @property
    def compositions(self) -> int:
        return getattr(self, "steps", 1)


@dataclass(frozen=True)
class GaussianEvent(PrivacyEvent):
    """Gaussian mechanism over the whole dataset (no sampling), released `steps` times."""

    mechanism: ClassVar[str] = "gaussian"
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1
    note: str = field(default="", compare=False)

    def _check_sample_rate(self, what: str) -> None:
        if self.sample_rate != 1.0:
            raise BadInput(f"{what}: sample_rate={self.sample_rate!r}; it must be 1.0 (use poisson_gaussian)")


@dataclass(frozen=True)
class PoissonGaussianEvent(PrivacyEvent):
    """DP-SGD-style: Poisson subsampling with rate q, then the Gaussian mechanism, `steps` times."""

    mechanism: ClassVar[str] = "poisson_gaussian"
    noise_multiplier: float
    sample_rate: float
    steps: int
    note: str = field(default="", compare=False)

    def _check_sample_rate(self, what: str) -> None:
        if not (isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1):
            raise BadInput(f"{what}: sample_rate={self.sample_rate!r}; it must be in (0, 1]")


@dataclass(frozen=True)
class ShardGaussianEvent(PrivacyEvent):
    """`steps` Gaussian releases, each computed from one of `shards` fixed disjoint shards
    drawn uniformly per step (GS-WGAN). Each image sits in one shard, drawn uniformly and
    kept secret, for all steps; the shard index of each step is treated as public. An image
    is then touched by K ~ Bin(steps, 1/shards) of the steps, and the event is dominated by
    the binomial mixture of K-fold Gaussians: delta(eps) = E_K[delta_Gauss(eps; sqrt(K)/sigma)]
    (privacy/accountant.py). No amplification beyond that: which steps touch the image is
    not hidden."""

    mechanism: ClassVar[str] = "shard_gaussian"
    noise_multiplier: float
    shards: int
    steps: int
    note: str = field(default="", compare=False)


@dataclass(frozen=True)
class LaplaceEvent(PrivacyEvent):
    """Laplace mechanism with scale b = sensitivity / epsilon0 (pure epsilon0-DP), `steps` times."""

    mechanism: ClassVar[str] = "laplace"
    epsilon0: float
    steps: int = 1
    note: str = field(default="", compare=False)


def _check_count(name: str, value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadInput(f"{what}: {name}={value!r}; it must be an integer >= 1")


EVENT_TYPES: dict[str, type[PrivacyEvent]] = {
    cls.mechanism: cls for cls in (GaussianEvent, PoissonGaussianEvent, ShardGaussianEvent, LaplaceEvent)
}


def event_from_dict(record: dict) -> PrivacyEvent:
    """Parse one manifest record; unknown mechanisms or fields are refused, never skipped
    (skipping an event would under-count epsilon)."""
    if not isinstance(record, dict) or "mechanism" not in record:
        raise BadInput(f"privacy event {record!r} has no 'mechanism'")
    cls = EVENT_TYPES.get(record["mechanism"])
    if cls is None:
        raise BadInput(f"privacy event mechanism {record['mechanism']!r} is unknown; known: {', '.join(EVENT_TYPES)}")
    allowed = {f.name for f in fields(cls)}
    extra = set(record) - allowed - {"mechanism"}
    kwargs = {k: v for k, v in record.items() if k in allowed}
    try:
        event = cls(**kwargs)
    except TypeError as exc:
        raise BadInput(f"privacy event {record!r} is malformed: {exc}") from None
    if extra - OPTIONAL_RECORD_FIELDS:
        raise BadInput(f"privacy event {record!r} has unknown fields {sorted(extra - OPTIONAL_RECORD_FIELDS)}")
    return event


# Informational fields a manifest record may carry beside the event's own (not used in accounting).
OPTIONAL_RECORD_FIELDS = {"time", "epsilon_after", "accountant", "l2_sensitivity"}
