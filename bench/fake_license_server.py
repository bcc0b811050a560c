"""A stand-in license server for ``make bench-license``: tests/license_fake.py's server side of
``protheus_broker/license/protocol.py`` (counted seats, leases with a TTL; no journal, no grace),
listening on 127.0.0.1.  Used until the real ``protheus-license`` is on main.

``python bench/fake_license_server.py --port 0 --secret-file F --seats 10000`` logs
``listening on 127.0.0.1:PORT``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402

from tests.license_fake import FakeLicenseFactory, FakeLicenseServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--seats", type=int, default=10000)
    parser.add_argument("--ttl", type=float, default=30.0)
    args = parser.parse_args()
    secret = Path(args.secret_file).read_bytes().splitlines()[0].strip()
    server = FakeLicenseServer(reactor, {"TOTVS_I": args.seats}, secret, ttl=args.ttl)
    port = reactor.listenTCP(args.port, FakeLicenseFactory(server), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"fake license server listening on 127.0.0.1:{port.getHost().port}", flush=True)

    def report() -> None:
        counts: dict[str, int] = {}
        for kind, _ in server.log:
            counts[kind] = counts.get(kind, 0) + 1
        print(f"messages: {counts}; leased TOTVS_I now {server.leased('TOTVS_I')}", flush=True)
        server.log.clear()
    reactor.addSystemEventTrigger("before", "shutdown", report)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
