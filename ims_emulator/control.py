"""The control API under `/__emulator/`, for tests that run the emulator as a subprocess.

Loopback peers only. Routes (JSON in, JSON out):

- `GET stats` — counters (requests per flow, issued, rejected per error,
  faults per kind, OAuth `org_id`s seen, the clock offset);
- `POST faults` — a `FaultSpec` (queue, fail_rate, mix, retry_after, delay_seconds, seed);
- `POST clients` — a `ClientSpec`: registers a client or changes the fields given;
- `POST down` / `POST up` — drop every token request unanswered, or stop doing so;
- `POST reset` — zero the counters;
- `GET clock` / `POST clock` `{"offset_seconds": N}` — the emulator's clock
  offset, which moves its `Date` header and how it judges `exp`.

`Emulator` (server.py) offers the same in-process.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ims_emulator.specs import ClientSpec, FaultSpec
from ims_emulator.state import State

__all__ = ["PREFIX", "Answer", "handle", "is_loopback"]

PREFIX = "/__emulator/"


@dataclass(frozen=True)
class Answer:
    status: int
    document: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = field(default=())


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 and ::1, also as an IPv4-mapped IPv6 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _error(status: int, error: str, description: str, *headers: tuple[str, str]) -> Answer:
    return Answer(status, {"error": error, "error_description": description}, headers)


def _clients(state: State, document: dict[str, Any]) -> dict[str, Any]:
    spec = ClientSpec.from_mapping(document)
    state.register(spec)
    return {"client_id": spec.client_id, "registered": True}


def _clock(state: State, document: dict[str, Any]) -> dict[str, Any]:
    if set(document) != {"offset_seconds"}:
        raise ValueError('expected {"offset_seconds": N}')
    return {"offset_seconds": state.set_clock_offset(document["offset_seconds"])}


def _switch(down: bool) -> Callable[[State, dict[str, Any]], dict[str, Any]]:
    def route(state: State, document: dict[str, Any]) -> dict[str, Any]:
        state.set_down(down)
        return {"down": down}

    return route


def _reset(state: State, document: dict[str, Any]) -> dict[str, Any]:
    state.reset_stats()
    return {"reset": True}


_POSTS: dict[str, Callable[[State, dict[str, Any]], dict[str, Any]]] = {
    "faults": lambda state, document: state.set_faults(FaultSpec.from_mapping(document)),
    "clients": _clients,
    "clock": _clock,
    "down": _switch(True),
    "up": _switch(False),
    "reset": _reset,
}
_GETS: dict[str, Callable[[State], dict[str, Any]]] = {
    "stats": State.stats,
    "clock": lambda state: {"offset_seconds": state.clock_offset_s},
}


def handle(state: State, peer: str, method: str, route: str, body: bytes) -> Answer:
    """Answer one control request (`route` is the path after the prefix)."""
    if not is_loopback(peer):
        return _error(403, "forbidden", "the control API answers loopback peers only")
    if route not in _POSTS and route not in _GETS:
        return _error(404, "not_found", "no such control endpoint")
    if method == "GET" and route in _GETS:
        return Answer(200, _GETS[route](state))
    if method != "POST" or route not in _POSTS:
        allowed = ", ".join(m for m, table in (("GET", _GETS), ("POST", _POSTS)) if route in table)
        return _error(405, "method_not_allowed", f"use {allowed}", ("Allow", allowed))
    return _post(state, route, body)


def _post(state: State, route: str, body: bytes) -> Answer:
    """Apply one control change: a JSON object, validated whole before anything changes."""
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return _error(400, "bad_request", f"{route}: expected a JSON object")
    try:
        return Answer(200, _POSTS[route](state, document))
    except ValueError as exc:
        # Validation happens before anything changes: half an update is worse than none.
        return _error(400, "bad_request", f"{route}: {exc}")
