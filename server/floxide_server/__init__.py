"""The floxide-grpc orchestrator server (installed as ``floxide_server``).

It serves the orchestrator, worker-stream and store services, and keeps every piece of state in
etcd. It imports the SDK (``floxide_grpc``), never the worker.
"""

__all__: list[str] = []
