"""The app's index when it runs with --service: a running koclip.serve, searched over HTTP."""
from __future__ import annotations

from dataclasses import dataclass

from koclip.errors import QueryError


@dataclass(frozen=True)
class ServiceIndex:
    """An index of a running koclip.serve service, searched over HTTP (koclip.client)."""

    url: str
    name: str
    version: str
    rows: int
    fingerprint: str

    def __len__(self) -> int:
        return self.rows

    def client(self):
        from koclip.client import ServiceClient

        return ServiceClient(self.url, index=self.name)

    def search(self, text: str, k: int):
        return self.client().search(text, k=k)


def connect_service(url: str, name: str | None) -> ServiceIndex:
    """The service's image index `name` (default: its first), as /readyz describes it."""
    from koclip.client import ServiceClient

    client = ServiceClient(url, index=name)
    ready = client.ready()
    name = name or client.indices()[0]
    for entry in ready["indexes"]:
        if entry["name"] == name and entry["modality"] == "image":
            return ServiceIndex(url, name, entry["version"], int(entry["rows"]), ready["model"])
    raise QueryError(f"the service at {url} has no image index named {name!r}")
