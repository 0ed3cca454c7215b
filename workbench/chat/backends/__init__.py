"""Backends behind one interface: the local engine (`LocalBackend`) or a remote GLM endpoint (`RemoteBackend`)."""

from workbench.chat.backends.base import Backend, fold_chunks
from workbench.chat.backends.local import LocalBackend
from workbench.chat.backends.remote import RemoteBackend

__all__ = ["Backend", "LocalBackend", "RemoteBackend", "fold_chunks"]
