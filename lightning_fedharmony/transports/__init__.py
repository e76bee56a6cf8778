"""How instructions reach clients and updates come back: in memory (clients trained in this process) or through a
shared folder (clients are other processes, e.g. LightningCLI runs with
:class:`~lightning_fedharmony.client.FederatedClient`)."""

from lightning_fedharmony.transports.base import Transport
from lightning_fedharmony.transports.folder import FolderMailbox, FolderTransport
from lightning_fedharmony.transports.memory import InMemoryTransport

__all__ = ["FolderMailbox", "FolderTransport", "InMemoryTransport", "Transport"]
