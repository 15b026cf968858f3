"""The server's state: every store of the contracts, over a transactional key-value store."""

__all__: list[str] = []
