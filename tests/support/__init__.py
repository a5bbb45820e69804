"""Code the test groups share (not fixtures: those are in tests/conftest.py).

keys       the one credentials generator: key material and every credentials shape
leaks      the one leak scanner: secrets, private-key headers and JWT-shaped strings
harness    the real CLI as a subprocess, with every output scanned at teardown
scripted   the refresh loop wired to a scripted IMS and a fake clock
fakes      a clock that a sleep advances
fakeapi    the fake Kubernetes apiserver on a real socket
ims_wire   IMS's wire protocol by hand (raw requests + PyJWT), to check the emulator
manifests  rendered kustomizations read as Kubernetes would, and container hardening
chart      the Helm chart rendered per Kubernetes version and values
injection  pod templates, the injection function and CLI, AdmissionReviews
"""
