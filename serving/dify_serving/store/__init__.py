"""Persistence backends. `LocalStateStore` keeps the desired state on one machine."""

from dify_serving.store.local import LocalStateStore

__all__ = ["LocalStateStore"]
