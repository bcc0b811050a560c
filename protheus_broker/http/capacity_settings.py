"""``REMOTE_SERVER_xx = host port [max]`` for ``[BALANCE_WEB_SERVICES]``: the optional request cap."""

from __future__ import annotations

from protheus_broker.balancing.servers import RemoteServer
from protheus_broker.ini import Section, host_and_port, parse_port, valid_host

#: The largest cap we accept: more simultaneous requests than any AppServer has threads for.
MAX_CAP = 100_000


def parse_capped_server(section: Section, key: str, server_id: str) -> tuple[RemoteServer, int]:
    """``host port`` or ``host port max``: the server and its cap on in-flight requests (0 = no cap).

    A bad value is one :class:`~protheus_broker.ini.ConfigError` naming file, line and key."""
    value = section.raw(key) or ""
    fields = value.split()
    if len(fields) > 3:
        raise section.error(key, f"expected 'host port [max]', got {value!r}")
    if len(fields) < 3:
        host, port = host_and_port(section, key)  # its messages for 'host port' shapes
        return RemoteServer(server_id=server_id, host=host, port=port), 0
    host, port_text, cap_text = fields
    if not valid_host(host):
        raise section.error(key, f"{host!r} is not a host name or IP address")
    host = host.strip("[]")  # [::1] as people write it; connectTCP wants ::1
    port = parse_port(section, key, port_text)
    try:
        cap = int(cap_text)
    except ValueError:
        raise section.error(
            key, f"the third field caps simultaneous requests and must be a whole number, got {cap_text!r}"
        ) from None
    if not 0 <= cap <= MAX_CAP:
        raise section.error(key, f"request cap {cap} is out of range (0 = no cap, up to {MAX_CAP})")
    return RemoteServer(server_id=server_id, host=host, port=port), cap

