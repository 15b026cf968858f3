"""The installed distribution's version, and the worker-stream protocol version it speaks."""

from importlib.metadata import version

__all__ = ["PROTOCOL_VERSION", "__version__"]

__version__: str = version("floxide-grpc")
"""The installed distribution's version."""

PROTOCOL_VERSION: int = 1
"""The worker-stream protocol version this SDK speaks (``Hello.protocol_version``)."""
