"""A local Adobe IMS: checks token requests the way IMS does and answers in IMS's shapes.

It is the independent check on the client, so it imports nothing from the
`refresher` package (see `.importlinter`): a misreading of IMS shared by both
sides would otherwise pass every test. Only the standard library's
`http.server`, PyJWT and cryptography.

The package, by concern:

- `specs` — `ClientSpec` and `FaultSpec`, the shapes state, control API and CLI share;
- `credentials` — generate credentials in the Developer Console's shapes, read them back;
- `tls` — a local CA and the server certificate;
- `state` — clients, faults, counters and the (offset) clock, behind one lock;
- `assertion` — check a JWT assertion as IMS does;
- `exchange` — the JWT and OAuth exchanges and the tokens they issue;
- `forms` — a request's fields (query string, urlencoded or multipart body);
- `handler` — HTTP: routes, IMS-shaped answers, injected faults, the request log;
- `control` — the `/__emulator/` control API;
- `server` — `Emulator`, the in-process API;
- `cli` — `python -m ims_emulator` / `refresher emulator`, with `IMS_EMULATOR_*`.

Limits: tokens are signed with a key generated at each start (nothing here
verifies them against IMS's published keys), and there is one IMS region.
"""

from __future__ import annotations

from ims_emulator.credentials import AEM_CREDENTIALS_FILE, OAUTH_CREDENTIALS_FILE, write_credentials
from ims_emulator.server import Emulator
from ims_emulator.specs import DEFAULT_FAULT_MIX, FAULT_KINDS, ClientSpec, FaultSpec
from ims_emulator.tls import CA_FILE

__all__ = [
    "AEM_CREDENTIALS_FILE",
    "CA_FILE",
    "DEFAULT_FAULT_MIX",
    "FAULT_KINDS",
    "OAUTH_CREDENTIALS_FILE",
    "ClientSpec",
    "Emulator",
    "FaultSpec",
    "write_credentials",
]
