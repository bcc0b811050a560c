"""The AppServers a pool is made of, as configured."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RemoteServer:
    """One ``REMOTE_SERVER_<id> = host port`` line, or a managed node (nodes/manager.py), which
    may listen on a Unix socket (*unix*: its path; then *host* and *port* are not used)."""

    server_id: str
    host: str
    port: int
    unix: str = ""

    @property
    def address(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"
