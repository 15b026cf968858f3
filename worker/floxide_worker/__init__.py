"""The floxide-grpc worker runtime (installed as ``floxide_worker``).

It connects to an orchestrator server over one stream, runs the nodes it serves and reports
their transitions. It imports the SDK (``floxide_grpc``), never the server.
"""

from floxide_worker.worker import Worker, WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
