"""The test suite, grouped like the code it tests.

unit/         one module or pure function at a time (a server module over loopback sockets)
e2e/          the real CLI as a subprocess against the IMS emulator and the fake apiserver
deploy/       what a cluster is given: chart, manifests, monitoring, image, sidecar injection
reliability/  faults, attacks and long runs, with figures (see docs/reliability.md)
support/      code the groups share: credentials, the leak scanner, the harness, the fakes

Fixtures every group uses live in tests/conftest.py.
"""
