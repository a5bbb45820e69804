"""Reliability and security evidence: soak, outage, crash, disk, Kubernetes and transport
suites. Short versions run in `make test`; the long ones (marker `soak`) in `make soak`."""
