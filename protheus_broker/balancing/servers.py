"""The AppServers a pool is made of, as configured."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteServer:
    """One ``REMOTE_SERVER_<id> = host port`` line."""

    server_id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
