"""``protheus-broker-ctl``: the broker screen's API from a terminal, as tables.

    protheus-broker-ctl [--url URL] [--token TOKEN | --token-file PATH] COMMAND [ARG]
    commands: status | servers | sessions [PAGE] | drain ID | ready ID | down ID | close SID |
              reload | hash-token

URL defaults to $PROTHEUS_BROKER_URL or http://127.0.0.1:8480; the token to
$PROTHEUS_BROKER_TOKEN.  ``hash-token`` prints a new random token and the TOKEN_HASH line for
[BROKER_ADMIN] (or hashes the token read from stdin with ``--stdin``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from .web.auth import hash_token, new_token

DEFAULT_URL = "http://127.0.0.1:8480"


class CtlError(Exception):
    """Something to print on stderr with exit status 1."""


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: The broker is reached directly: an http_proxy meant for the web (or the one Debian package
#: builds set) must not swallow admin calls to a broker on this host or the LAN.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, token: str | None, method: str, path: str) -> Any:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url.rstrip("/") + path, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CtlError(f"{method} {path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CtlError(f"cannot reach the broker at {url}: {getattr(exc, 'reason', exc)}") from None


def _servers_table(servers: list[dict[str, Any]]) -> str:
    rows = []
    for s in servers:
        m = s.get("metrics") or {}
        rows.append([s["id"], s["address"], s["state"], s["connections"], s.get("standby", 0), s["total"],
                     s["connect_failures"], m.get("memory_bytes"), m.get("users"), m.get("threads"),
                     m.get("cpu_percent"), m.get("age_seconds"), s["reason"]])
    return table(["ID", "ADDRESS", "STATE", "CONN", "STANDBY", "TOTAL", "FAILS", "MEMORY", "USERS",
                  "THREADS", "CPU%", "AGE", "REASON"], rows)


def render(command: str, body: Any) -> str:
    if command == "status":
        t = body["totals"]
        out = [f"protheus-broker {body['version']}, up {body['uptime_seconds']:.0f}s, config {body['config_path']}",
               f"sessions {t['sessions']} (total {t['sessions_total']}, failed {t['sessions_failed']}, "
               f"refused {t['sessions_refused']}), standby {t['standby']}, bytes in {t['bytes_in']} "
               f"out {t['bytes_out']}, connect failures {t['connect_failures']}, resumes {t['resumes']}, "
               f"handshake failures {t['handshake_failures']}"]
        for pool in body["pools"]:
            out.append(f"\npool {pool['name']} on {pool['listen']}: SORT_METHOD {pool['sort_method']}, "
                       f"MONITORING_TYPE {pool['monitoring_type']}")
            out.append(_servers_table(pool["servers"]))
        return "\n".join(out)
    if command == "servers":
        return _servers_table(body["servers"])
    if command == "sessions":
        rows = [[s["id"], s["client"], s["server"], s["state"], f"{s['duration_seconds']:.0f}s",
                 s["bytes_in"], s["bytes_out"]] for s in body["sessions"]]
        return (table(["ID", "CLIENT", "SERVER", "STATE", "AGE", "BYTES IN", "BYTES OUT"], rows)
                + f"\npage {body['page']} of {body['pages']}, {body['total']} sessions, "
                  f"{len(body['standby'])} in standby")
    if "server" in body and isinstance(body["server"], dict):
        s = body["server"]
        return f"{body['action']}: server {s['id']} is now {s['state']} ({s['reason']})"
    return f"{body.get('action', command)}: done"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protheus-broker-ctl", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("PROTHEUS_BROKER_URL", DEFAULT_URL),
                   help="the broker screen (default $PROTHEUS_BROKER_URL or %(default)s)")
    p.add_argument("--token", default=os.environ.get("PROTHEUS_BROKER_TOKEN"),
                   help="admin token (default $PROTHEUS_BROKER_TOKEN)")
    p.add_argument("--token-file", help="read the admin token from the first line of this file")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    p.add_argument("--stdin", action="store_true", help="hash-token: hash the token read from stdin")
    p.add_argument("command", choices=["status", "servers", "sessions", "drain", "ready", "down", "close",
                                       "reload", "hash-token"])
    p.add_argument("arg", nargs="?", help="server ID, session id, or page number for sessions")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "hash-token":
        token = sys.stdin.readline().strip() if args.stdin else new_token()
        if len(token) < 16:
            raise CtlError("the token must be at least 16 characters")
        if not args.stdin:
            print(f"token (give it to admins; not stored anywhere): {token}")
        print(f"TOKEN_HASH = {hash_token(token)}")
        return 0
    token = args.token
    if args.token_file:
        with open(args.token_file) as handle:
            token = handle.readline().strip()
    needs_arg = args.command in ("drain", "ready", "down", "close")
    if needs_arg and not args.arg:
        raise CtlError(f"{args.command} needs {'a session id' if args.command == 'close' else 'a server ID'}")
    if args.command == "status":
        method, path = "GET", "/api/v1/status"
    elif args.command == "servers":
        method, path = "GET", "/api/v1/servers"
    elif args.command == "sessions":
        page = args.arg or "1"
        if not page.isdigit():
            raise CtlError(f"sessions: page must be a number, got {page!r}")
        method, path = "GET", f"/api/v1/sessions?page={page}"
    elif args.command == "reload":
        method, path = "POST", "/api/v1/reload"
    elif args.command == "close":
        method, path = "POST", f"/api/v1/sessions/{urllib.parse.quote(args.arg)}/close"
    else:
        method, path = "POST", f"/api/v1/servers/{urllib.parse.quote(args.arg, safe='')}/{args.command}"
    body = call(args.url, token, method, path)
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else render(args.command, body))
    return 0


def main() -> None:
    try:
        sys.exit(run())
    except CtlError as exc:
        print(f"protheus-broker-ctl: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
