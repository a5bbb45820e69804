"""Everything the request threads share, behind one lock: clients, faults, stats and the clock."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ims_emulator.specs import (
    DEFAULT_FAULT_MIX,
    DEFAULT_FAULTS,
    ClientSpec,
    FaultSpec,
    clock_offset,
    token_ttl,
)

__all__ = ["State"]


class State:
    """The emulator's mutable state. Every method is safe to call from any thread."""

    def __init__(self, *, token_ttl_s: float, tls: bool, clock_offset_s: float = 0.0) -> None:
        self.token_ttl_s = token_ttl(token_ttl_s)
        self.tls = tls
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # ends injected delays at shutdown
        # Issued tokens are signed with a key of the emulator's own, never a client's.
        self.token_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.clients: dict[str, ClientSpec] = {}
        self.down = False
        self.faults = DEFAULT_FAULTS
        self.queue: deque[str] = deque()
        # Fault injection is test noise, not security: a seeded PRNG makes a soak replayable.
        self.rng = random.Random()  # noqa: S311
        self._offset_s = clock_offset(clock_offset_s)
        self.requests: Counter[str] = Counter()
        self.issued = 0
        self.rejected: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.org_ids: Counter[str] = Counter()

    # -- the clock

    def now(self) -> float:
        """The emulator's clock (POSIX seconds): the real one moved by the clock offset.

        It judges JWT assertions' exp/iat/nbf, dates issued tokens and every
        `Date` header, as IMS's own clock does for a client whose clock is off.
        """
        with self.lock:
            offset = self._offset_s
        return time.time() + offset

    @property
    def clock_offset_s(self) -> float:
        with self.lock:
            return self._offset_s

    def set_clock_offset(self, seconds: object) -> float:
        checked = clock_offset(seconds)
        with self.lock:
            self._offset_s = checked
        return checked

    # -- clients

    def register(self, spec: ClientSpec) -> None:
        """Add a client, or change the fields `spec` sets on an existing one. Raises ValueError."""
        with self.lock:
            current = self.clients.get(spec.client_id)
            if current is None and spec.client_secrets is None:
                raise ValueError("a new client needs client_secrets")
            self.clients[spec.client_id] = spec if current is None else current.updated(spec)

    def client(self, client_id: str) -> ClientSpec | None:
        with self.lock:
            return self.clients.get(client_id)

    # -- faults

    def set_faults(self, change: FaultSpec) -> dict[str, Any]:
        """Apply the settings `change` sets; return them all as the control API shows them."""
        with self.lock:
            if change.queue is not None:
                self.queue = deque(change.queue)
            if change.seed is not None:
                self.rng.seed(change.seed)
            # The queue lives in a deque (requests consume it); the seed is applied, not kept.
            self.faults = self.faults.updated(replace(change, queue=None, seed=None))
            return {**self.faults.settings(), "queue": list(self.queue)}

    def set_down(self, down: bool) -> None:
        with self.lock:
            self.down = down

    def count_request(self, kind: str) -> bool:
        """Count a token request; True if the emulator is down (the request is dropped)."""
        with self.lock:
            self.requests[kind] += 1
            if self.down:
                self.fault_counts["down"] += 1
            return self.down

    def take_fault(self) -> str | None:
        """The fault for this token request: the queue first, then the random rate."""
        with self.lock:
            rate = self.faults.fail_rate or 0.0
            if self.queue:
                kind: str | None = self.queue.popleft()
            elif rate > 0 and self.rng.random() < rate:
                kind = self.rng.choice(self.faults.mix or DEFAULT_FAULT_MIX)
            else:
                kind = None
            if kind is not None:
                self.fault_counts[kind] += 1
            return kind

    # -- stats

    def count_rejected(self, error: str) -> None:
        with self.lock:
            self.rejected[error] += 1

    def count_issued(self) -> None:
        with self.lock:
            self.issued += 1

    def count_org_id(self, org_id: str) -> None:
        with self.lock:
            self.org_ids[org_id] += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": {"jwt": self.requests["jwt"], "oauth": self.requests["oauth"]},
                "issued": self.issued,
                "rejected": dict(self.rejected),
                "faults": dict(self.fault_counts),
                "down": self.down,
                "queued_faults": len(self.queue),
                "org_ids": dict(self.org_ids),
                "clock_offset_seconds": self._offset_s,
            }

    def reset_stats(self) -> None:
        with self.lock:
            self.requests.clear()
            self.issued = 0
            self.rejected.clear()
            self.fault_counts.clear()
            self.org_ids.clear()
