"""floxide-grpc: distributed workflows over gRPC, with etcd as the only state.

The SDK shared by the orchestrator server and the workers. The wire contracts live in
``proto/floxide/v1``; their generated code, in ``floxide_grpc._proto``, is private.
"""

from importlib.metadata import version as _version

__all__ = ["PROTOCOL_VERSION", "__version__"]

__version__: str = _version("floxide-grpc")
"""The installed distribution's version."""

PROTOCOL_VERSION: int = 1
"""The worker-stream protocol version this SDK speaks (``Hello.protocol_version``)."""
