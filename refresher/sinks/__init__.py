"""Where a token is published. Every sink follows the `Sink` protocol."""

from __future__ import annotations

from typing import Protocol

from refresher.token import AccessToken


class Sink(Protocol):
    name: str
    """`file` or `secret`: the `sink` label of `refresher_sink_write_total`."""
    shared: bool
    """Other replicas write it too: read it before minting, and publish to it first."""

    def prepare(self) -> None:
        """Get ready before the first read: create what is missing, clean up leftovers.

        Raises PublishError when the sink is unusable (exit 1 at start).
        """
        ...

    def read_current(self) -> AccessToken | None:
        """The token this sink holds now, or None (missing, unreadable, foreign).

        Used for adoption at start and before each mint (replicas share a Secret).
        Never raises for a missing/garbled token; raises PublishError only when the
        sink itself cannot be reached (so the caller can log and count it).
        """
        ...

    def publish(self, token: AccessToken) -> AccessToken:
        """Publish `token` atomically; return the token the sink holds afterwards.

        That is `token` itself, or a newer valid token another writer published
        concurrently (a Secret conflict), which the caller then adopts.
        Raises PublishError; the previously published token must survive a failure.
        """
        ...
