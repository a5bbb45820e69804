"""`Emulator`: the IMS emulator on a real socket, served from a background thread.

This is the Python API tests use in-process; the control API (control.py)
offers the same to a subprocess.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives import serialization

from ims_emulator import specs
from ims_emulator.credentials import clients_in, ensure_credentials, existing_credentials
from ims_emulator.handler import Handler
from ims_emulator.specs import ClientSpec, FaultSpec
from ims_emulator.state import State
from ims_emulator.tls import server_context

__all__ = ["Emulator", "Server"]

_log = logging.getLogger("ims_emulator")


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up shutdown

    def __init__(self, host: str, port: int, state: State) -> None:
        self.state = state
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def authority(self) -> str:
        host = str(self.server_address[0])
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.server_port}" if ":" in host else f"{host}:{self.server_port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End kept-alive connections too: a stopped emulator must stop answering."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a read timeout, a failed TLS handshake)
        # is routine here: one line, no traceback, and only the exception's type.
        if not self.state.stopping.is_set():
            _log.debug("connection from %s ended: %s", client_address[0], sys.exc_info()[0])


class Emulator:
    """An IMS emulator serving on a real socket from a background thread.

    `Emulator.start(dir)` writes credentials into `dir` unless they are there
    already (then it accepts those), registers them and any Developer Console
    project JSON found there, and listens.
    """

    def __init__(self, server: Server, *, credentials_dir: Path | None, ca_path: Path | None):
        self._server = server
        self._state = server.state
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._stopped = False
        self.credentials_dir = credentials_dir
        self.credential_files: dict[str, Path] = {}
        self.ca_path = ca_path
        self.host = str(server.server_address[0])
        self.port: int = server.server_port
        self.endpoint = server.authority  # host:port, as in the AEM JSON's imsEndpoint
        self.base_url = f"{'https' if self._state.tls else 'http'}://{self.endpoint}"
        self.token_public_key_pem = (
            self._state.token_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            .decode()
        )

    @classmethod
    def start(
        cls,
        credentials_dir: Path | None,
        *,
        token_ttl_s: float = 86400,
        tls: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        cert_days: float = 365,
        tls_dir: Path | None = None,
        generate: bool = True,
        clock_offset_s: float = 0.0,
    ) -> Emulator:
        """Bind, register the credentials in `credentials_dir`, and serve in a thread.

        With `generate` (the default) missing credential files are written first;
        without it only existing files are loaded (FileNotFoundError if none).
        Raises OSError if the address cannot be bound, ValueError on bad settings.
        """
        state = State(token_ttl_s=token_ttl_s, tls=tls, clock_offset_s=clock_offset_s)
        cert_days = specs.cert_days(cert_days)
        context, ca_path = None, None
        if tls:
            tls_home = tls_dir or credentials_dir
            if tls_home is None:
                raise ValueError("TLS needs a directory for ca.pem (tls_dir or credentials_dir)")
            context, ca_path = server_context(tls_home)
        server = Server(host, port, state)
        emulator = cls(server, credentials_dir=credentials_dir, ca_path=ca_path)
        try:
            if credentials_dir is not None:
                emulator.credential_files = (
                    ensure_credentials(credentials_dir, server.authority, cert_days)
                    if generate
                    else existing_credentials(credentials_dir)
                )
                for client in clients_in(credentials_dir):
                    state.register(client)
            if context is not None:
                # Handshakes happen in each connection's thread (see Handler.setup).
                server.socket = context.wrap_socket(
                    server.socket, server_side=True, do_handshake_on_connect=False
                )
        except BaseException:
            server.server_close()
            raise
        emulator._thread.start()
        return emulator

    def __enter__(self) -> Emulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Emulator(base_url={self.base_url!r}, credentials_dir={self.credentials_dir!r})"

    def stats(self) -> dict[str, Any]:
        """Counters: requests per flow, issued, rejected per error code, faults per kind,
        OAuth org_ids seen, and the clock offset."""
        return self._state.stats()

    def reset_stats(self) -> None:
        self._state.reset_stats()

    def set_faults(self, **settings: object) -> dict[str, Any]:
        """Change fault injection (the fields of `FaultSpec`); one left out or None keeps its
        setting, `queue=[]` clears the queue. Raises ValueError."""
        return self._state.set_faults(FaultSpec.from_mapping(settings))

    def down(self) -> None:
        """From now on drop every token request without an answer (an outage)."""
        self._state.set_down(True)

    def up(self) -> None:
        self._state.set_down(False)

    def register_client(
        self, client_id: str, client_secrets: list[str] | None = None, **fields: object
    ) -> None:
        """Register a client, or change the given fields of one (e.g. revoke a secret).
        `fields` are those of `ClientSpec`. Raises ValueError."""
        document = {"client_id": client_id, "client_secrets": client_secrets, **fields}
        self._state.register(ClientSpec.from_mapping(document))

    @property
    def clock_offset_s(self) -> float:
        return self._state.clock_offset_s

    def set_clock_offset(self, seconds: float) -> None:
        """Move the emulator's clock (its `Date` header, how it judges `exp`) by `seconds`
        from the real one: positive runs ahead, as if the client's clock were behind."""
        self._state.set_clock_offset(seconds)

    def stop(self) -> None:
        """Stop listening, end open connections and injected delays. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._state.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)
