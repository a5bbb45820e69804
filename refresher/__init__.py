"""ims-token-refresher: keeps an Adobe IMS access token fresh for the pod next to it."""

__version__ = "0.1.0"
