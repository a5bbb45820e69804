"""The two settings shapes every part of the emulator shares: a client and the fault mix.

`ClientSpec` and `FaultSpec` are spelled out here once; the state stores them,
the control API and the Python API build them from a mapping
(`from_mapping`, which refuses unknown fields), and the CLI builds them from
its flags. A field left `None` in a spec means "keep what is there", so one
shape serves both a full registration and a partial update (a revoked secret).
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "DEFAULT_FAULTS",
    "DEFAULT_FAULT_MIX",
    "FAULT_KINDS",
    "MAX_CLOCK_OFFSET_S",
    "ClientSpec",
    "FaultSpec",
    "cert_days",
    "clock_offset",
    "fault_kinds",
    "integer",
    "number",
    "token_ttl",
]

# Every kind of injected fault. `invalid_client` is a permanent rejection
# (revocation), so it is not in the default random mix of transient faults.
FAULT_KINDS = (
    "500",
    "502",
    "503",
    "504",
    "429",
    "delay",
    "drop",
    "badjson",
    "html",
    "invalid_client",
)
DEFAULT_FAULT_MIX = ("500", "502", "503", "504", "429", "delay", "drop", "badjson", "html")

# Ten years either way: far beyond any clock skew worth testing, and far from
# the limits of datetime and of the HTTP date format.
MAX_CLOCK_OFFSET_S = 10 * 365 * 86400.0


def number(
    value: object, name: str, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    """A finite real number within bounds (a bool is not a number). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, not {value!r}")
    try:
        result = float(value) if isinstance(value, int | float | str) else math.nan
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, not {value!r}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, not {value!r}")
    return result


def integer(value: object, name: str, *, minimum: int = 0) -> int:
    """A whole number (`"7"` or `7`, never `7.5` or `True`). Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    try:
        result = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {value!r}") from None
    if result < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value!r}")
    return result


def clock_offset(value: object) -> float:
    """Seconds the emulator's clock runs ahead (positive) or behind (negative)."""
    return number(value, "clock offset", minimum=-MAX_CLOCK_OFFSET_S, maximum=MAX_CLOCK_OFFSET_S)


def token_ttl(value: object) -> float:
    """The lifetime of issued tokens in seconds: a millisecond to ten years."""
    return number(value, "token ttl", minimum=0.001, maximum=MAX_CLOCK_OFFSET_S)


def cert_days(value: object) -> float:
    """Validity of generated certificates in days; negative makes an expired one (tests)."""
    return number(value, "cert days", minimum=-36500, maximum=36500)


def fault_kinds(kinds: object) -> tuple[str, ...]:
    """A list of fault kinds, or one comma-separated string of them. Raises ValueError."""
    items = kinds.split(",") if isinstance(kinds, str) else kinds
    if not isinstance(items, Iterable) or not all(isinstance(k, str) for k in items):
        raise ValueError("expected a list of fault kinds")
    checked = tuple(kind.strip() for kind in items if kind.strip())
    unknown = [kind for kind in checked if kind not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
    return checked


def _names(value: object, name: str) -> frozenset[str]:
    """Scopes or metascopes given as a list or as one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset) or not all(
        isinstance(item, str) for item in items
    ):
        raise ValueError(f"{name} must be a list of strings or a comma-separated string")
    return frozenset(item.strip() for item in items if item.strip())


def _spec_fields(cls: type[Any], document: Mapping[str, object]) -> dict[str, object]:
    """The mapping's fields, unknown names refused before anything changes; None dropped."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {', '.join(sorted(known))}")
    return {name: value for name, value in document.items() if value is not None}


@dataclass(frozen=True)
class FaultSpec:
    """Fault injection settings, or a change of them (a field left None keeps its setting).

    `queue` hits the next token requests in order; then each request gets a
    random kind from `mix` with probability `fail_rate` (seeded by `seed`, so a
    soak replays exactly). `retry_after` is the 429s' Retry-After (delta
    seconds), `delay_seconds` how long a `delay` fault holds its answer.
    """

    queue: tuple[str, ...] | None = field(default=None, metadata={"check": fault_kinds})
    fail_rate: float | None = field(
        default=None, metadata={"check": lambda v: number(v, "fail_rate", minimum=0, maximum=1)}
    )
    mix: tuple[str, ...] | None = field(default=None, metadata={"check": fault_kinds})
    retry_after: int | None = field(
        default=None, metadata={"check": lambda v: integer(v, "retry_after")}
    )
    delay_seconds: float | None = field(
        default=None,
        metadata={"check": lambda v: number(v, "delay_seconds", minimum=0, maximum=3600)},
    )
    seed: int | None = field(
        default=None, metadata={"check": lambda v: integer(v, "seed", minimum=-(2**63))}
    )

    @classmethod
    def from_mapping(cls, document: Mapping[str, object]) -> Self:
        """Validate a JSON document or keyword arguments. Raises ValueError."""
        given = _spec_fields(cls, document)
        checks: dict[str, Callable[[object], Any]] = {
            f.name: f.metadata["check"] for f in fields(cls)
        }
        converted: dict[str, Any] = {name: checks[name](value) for name, value in given.items()}
        spec = cls(**converted)
        if spec.mix is not None and not spec.mix:
            raise ValueError("the fault mix must name at least one kind")
        return spec

    def updated(self, change: FaultSpec) -> FaultSpec:
        """This spec with every field that `change` sets replaced."""
        return replace(self, **_set_fields(change))

    def settings(self) -> dict[str, Any]:
        """The settings as the control API shows them (lists, not tuples; no seed)."""
        return {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in fields(self)
            if f.name != "seed" and (value := getattr(self, f.name)) is not None
        }


DEFAULT_FAULTS = FaultSpec(
    queue=(), fail_rate=0.0, mix=DEFAULT_FAULT_MIX, retry_after=1, delay_seconds=5.0
)


@dataclass(frozen=True)
class ClientSpec:
    """A registered integration, or a change of one (a field left None keeps its value).

    The JWT exchange needs `certificate_pem` (the binding the assertion's
    signature must match), `org`, `technical_account_id` and `metascopes`;
    OAuth Server-to-Server needs `scopes`. Two secrets may be valid at once,
    as during a rotation in the Developer Console.
    """

    client_id: str
    client_secrets: tuple[str, ...] | None = field(default=None, repr=False)
    certificate_pem: str | None = field(default=None, repr=False)
    org: str | None = None
    technical_account_id: str | None = None
    metascopes: frozenset[str] | None = None
    scopes: frozenset[str] | None = None

    @classmethod
    def from_mapping(cls, document: Mapping[str, object]) -> Self:
        """Validate a JSON document or keyword arguments. Raises ValueError."""
        given = _spec_fields(cls, document)
        client_id = given.pop("client_id", None)
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id must be a non-empty string")
        converted = {name: _client_field(name, value) for name, value in given.items()}
        spec = cls(client_id=client_id, **converted)
        _ = spec.certificate  # a bad certificate is refused at registration, not per request
        return spec

    def updated(self, change: ClientSpec) -> ClientSpec:
        """This client with every field that `change` sets replaced."""
        return replace(self, **_set_fields(change))

    @cached_property
    def certificate(self) -> x509.Certificate | None:
        if self.certificate_pem is None:
            return None
        try:
            certificate = x509.load_pem_x509_certificate(self.certificate_pem.encode())
        except ValueError:
            raise ValueError("certificate_pem is not a PEM X.509 certificate") from None
        if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
            raise ValueError("certificate_pem must hold an RSA public key (the exchange is RS256)")
        return certificate

    def secret_matches(self, candidate: str) -> bool:
        # Compare with every secret in constant time; two may be valid during a rotation.
        return any(
            hmac.compare_digest(candidate.encode(), secret.encode())
            for secret in self.client_secrets or ()
        )


def _client_field(name: str, value: object) -> Any:
    """One field of a client document, checked and converted. Raises ValueError."""
    if name == "client_secrets":
        return _secrets(value)
    if name in ("metascopes", "scopes"):
        return _names(value, name)
    if name == "certificate_pem":
        pem = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if not isinstance(pem, str):
            raise ValueError("certificate_pem must be a PEM string")
        return pem
    if isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a string")


def _secrets(value: object) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not (
        isinstance(value, list | tuple) and all(isinstance(s, str) and s for s in value)
    ):
        raise ValueError("client_secrets must be a list of non-empty strings")
    return tuple(value)


def _set_fields(spec: ClientSpec | FaultSpec) -> dict[str, Any]:
    return {
        f.name: getattr(spec, f.name) for f in fields(spec) if getattr(spec, f.name) is not None
    }
