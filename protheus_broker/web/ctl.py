"""``protheus-broker-ctl``: the broker screen's API from a terminal, as tables.

    protheus-broker-ctl [--url URL] [--token TOKEN | --token-file PATH] [--pool SECTION] COMMAND [ARG]
    commands: status | servers | sessions [PAGE] | drain ID | ready ID | down ID | close SID |
              nodes | recycle NODE | discard NODE | scale MIN | reload | hash-token

URL defaults to $PROTHEUS_BROKER_URL or http://127.0.0.1:8480; the token to
$PROTHEUS_BROKER_TOKEN.  ``hash-token`` prints a new random token and the TOKEN_HASH line for
[BROKER_ADMIN] (or hashes the token read from stdin with ``--stdin``).

Every failure is one line on stderr: exit status 2 for a bad command line (an unreadable
``--token-file``, a ``--url`` that is not http(s)://HOST[:PORT]), 1 when the broker cannot be
reached or refuses (``HTTP 401: wrong token``) or answers something that is not its API.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from protheus_broker.web.auth import hash_token, new_token

DEFAULT_URL = "http://127.0.0.1:8480"


class CtlError(Exception):
    """Something to print on stderr, then exit with *status* (1: the broker; 2: the command line)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def usage_error(message: str) -> CtlError:
    return CtlError(message, status=2)


def check_url(url: str) -> str:
    """*url* if it is http(s)://HOST[:PORT][/PATH], else a usage error saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        raise usage_error(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage_error(f"--url {url!r}: expected http://HOST[:PORT] or https://HOST[:PORT], "
                          f"e.g. {DEFAULT_URL}")
    if parts.query or parts.fragment:
        raise usage_error(f"--url {url!r}: no query or fragment, only http(s)://HOST[:PORT][/PATH]")
    return url


def read_token_file(path: str) -> str:
    """The first line of *path*, stripped; a usage error if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.readline().strip()
    except OSError as exc:
        raise usage_error(f"--token-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise usage_error(f"--token-file {path}: not text (expected the token on the first line)") from None
    if not token:
        raise usage_error(f"--token-file {path}: the first line is empty (expected the token)")
    return token


def check_token(token: str | None, where: str) -> str | None:
    """A token that can go in an HTTP header (printable ASCII), else a usage error."""
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise usage_error(f"{where}: the token must be printable ASCII without spaces")
    return token or None


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


#: The most of an answer that is read (a status of thousands of sessions is far less).
MAX_ANSWER = 64 * 1024 * 1024


def call(url: str, token: str | None, method: str, path: str) -> Any:
    """The broker's JSON answer to *method* *path*; :class:`CtlError` for anything else."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        request = urllib.request.Request(url.rstrip("/") + path, method=method, headers=headers,
                                         data=b"" if method == "POST" else None)
        with _OPENER.open(request, timeout=10) as response:
            body = response.read(MAX_ANSWER)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read(65536)).get("error", exc.reason)
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            message = exc.reason
        raise CtlError(f"{method} {path}: HTTP {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise CtlError(f"cannot reach the broker at {url}: {exc.reason}") from None
    except http.client.BadStatusLine as exc:
        raise CtlError(f"{url} does not answer HTTP (it said {str(exc)[:60]!r}): is it the broker "
                       "screen ([BROKER_ADMIN] ENDPOINT)?") from None
    except (OSError, http.client.HTTPException) as exc:  # reset, timeout, a broken answer
        raise CtlError(f"cannot reach the broker at {url}: {exc or type(exc).__name__}") from None
    except ValueError as exc:  # what urllib makes of a URL it cannot use
        raise usage_error(f"--url {url!r}: {exc}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise CtlError(f"{url} did not answer JSON to {method} {path}: is it the broker screen "
                       "([BROKER_ADMIN] ENDPOINT)?") from None


def _servers_table(servers: list[dict[str, Any]]) -> str:
    rows = []
    for s in servers:
        m = s.get("metrics") or {}
        rows.append([s["id"], s["address"], s["state"], s["connections"], s.get("standby", 0), s["total"],
                     s["connect_failures"], m.get("memory_bytes"), m.get("users"), m.get("threads"),
                     m.get("cpu_percent"), m.get("age_seconds"), s["reason"]])
    return table(["ID", "ADDRESS", "STATE", "CONN", "STANDBY", "TOTAL", "FAILS", "MEMORY", "USERS",
                  "THREADS", "CPU%", "AGE", "REASON"], rows)


def since(moment: float) -> str:
    """A clock time as UTC text, as the broker's messages say it: ``2026-11-30 13:05:12Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(moment))


def _age(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds:.0f}s"


def _dependencies_table(dependencies: list[dict[str, Any]]) -> str:
    rows = [[d["name"], d["state"], since(d["since"]), _age(d["for_seconds"]), d["refused"],
             ",".join(d.get("pools") or []) or None, d["reason"] or None] for d in dependencies]
    return table(["DEPENDENCY", "STATE", "SINCE", "FOR", "REFUSED", "POOLS", "REASON"], rows)


def _license_lines(client: dict[str, Any]) -> list[str]:
    state = "connected" if client["connected"] else "not connected"
    out = [f"license client {client['client_name']}: {state} to {client['server']} since {since(client['since'])}"
           + (f" ({client['reason']})" if client["reason"] else "")]
    rows = [[name, c["held"], c["in_use"], c["free"], c["waiting"], c["leases"]]
            for name, c in client["classes"].items()]
    if rows:
        out.append(table(["CLASS", "HELD", "IN USE", "FREE", "WAITING", "LEASES"], rows))
    return out


def _nodes_table(nodes: list[dict[str, Any]]) -> str:
    rows = [[n["id"], n["state"] + (" (recycling)" if n.get("recycling") else ""),
             "yes" if n["persistent"] else "no", n["sessions"], n["memory_bytes"], _age(n["age_seconds"]),
             n["endpoint"]] for n in nodes]
    return table(["ID", "STATE", "PERSISTENT", "SESSIONS", "MEMORY", "AGE", "ENDPOINT"], rows)


def _farm_lines(farm: list[dict[str, Any]]) -> list[str]:
    return [f"farm host {h['host']} {h['state']} since {since(h['since'])} (for {_age(h['for_seconds'])}), "
            f"{len(h['nodes'])} node(s)" + (f": {', '.join(str(i) for i in h['nodes'])}" if h["nodes"] else "")
            + (f"; last problem: {h['problem']}" if h.get("problem") else "") for h in farm]


def _nodes(body: Any) -> str:
    """``nodes``: a table per pool with managed nodes, its farm hosts under it."""
    pools = [pool for pool in body["pools"] if pool.get("nodes") is not None]
    if not pools:
        return "no managed nodes (no pool has NODE_COMMAND or FARM_HOSTS)"
    out = []
    for pool in pools:
        n = pool["nodes"]
        head = (f"pool {pool['name']} [{pool['section']}]: MIN_NODES {n['min_nodes']}, MAX_NODES {n['max_nodes']}, "
                f"{n['transport']}, {len(n['nodes'])} node(s)")
        if n["crash_streak"] > 1:
            head += f", crash loop: {n['crash_streak']} failures in a row"
        if n.get("persistent_refused"):
            head += f", no persistent node: {n['persistent_refused']}"
        out.append("\n".join([head, _nodes_table(n["nodes"])] + _farm_lines(pool.get("farm") or [])))
    return "\n\n".join(out)


def _nodes_now(nodes: list[dict[str, Any]]) -> str:
    return f"{len(nodes)} node(s) now: " + (", ".join(f"{n['id']} {n['state']}" for n in nodes) or "none")


def _node_action(body: Any, node_id: str) -> str:
    """recycle/discard: done, and the pool's nodes now (an idle node is gone at once, and its id
    may already name its replacement)."""
    return f"{body['action']}: node {node_id} of {body['pool']}: done; {_nodes_now(body['nodes'])}"


def render(command: str, body: Any, arg: str | None = None) -> str:
    if command == "nodes":
        return _nodes(body)
    if command in ("recycle", "discard"):
        return _node_action(body, arg or "")
    if command == "scale":
        return f"scale: MIN_NODES of {body['pool']} is {body['min_nodes']} for this run; {_nodes_now(body['nodes'])}"
    if command == "status":
        t = body["totals"]
        out = [f"protheus-broker {body['version']}, up {body['uptime_seconds']:.0f}s, config {body['config_path']}",
               f"sessions {t['sessions']} (total {t['sessions_total']}, failed {t['sessions_failed']}, "
               f"refused {t['sessions_refused']}), standby {t['standby']}, bytes in {t['bytes_in']} "
               f"out {t['bytes_out']}, connect failures {t['connect_failures']}, resumes {t['resumes']}, "
               f"handshake failures {t['handshake_failures']}"]
        several = len(body["pools"]) > 1
        for pool in body["pools"]:
            section = f" [{pool.get('section')}]" if several else ""
            out.append(f"\npool {pool['name']}{section} on {pool['listen']}: SORT_METHOD {pool['sort_method']}, "
                       f"MONITORING_TYPE {pool['monitoring_type']}")
            out.append(_servers_table(pool["servers"]))
            if pool.get("nodes") is not None:
                n = pool["nodes"]
                states: dict[str, int] = {}
                for node in n["nodes"]:
                    states[node["state"]] = states.get(node["state"], 0) + 1
                out.append("nodes: " + (", ".join(f"{count} {state}" for state, count in sorted(states.items()))
                                        or "none")
                           + f" (MIN_NODES {n['min_nodes']}, MAX_NODES {n['max_nodes']}; protheus-broker-ctl nodes)")
                out.extend(_farm_lines(pool.get("farm") or []))
        if body.get("dependencies"):
            out.append("\n" + _dependencies_table(body["dependencies"]))
        if body.get("license_client"):
            out.append("")
            out.extend(_license_lines(body["license_client"]))
        return "\n".join(out)
    if command == "servers":
        pools: dict[str, list[dict[str, Any]]] = {}
        for server in body["servers"]:
            pools.setdefault(server.get("pool", ""), []).append(server)
        if len(pools) <= 1:
            return _servers_table(body["servers"])
        return "\n\n".join(f"pool {name}:\n{_servers_table(servers)}" for name, servers in pools.items())
    if command == "sessions":
        several = len({s.get("pool") for s in body["sessions"]}) > 1
        rows = [[s["id"]] + ([s.get("pool")] if several else [])
                + [s["client"], s["server"], s["state"], f"{s['duration_seconds']:.0f}s",
                   s["bytes_in"], s["bytes_out"]] for s in body["sessions"]]
        headers = ["ID"] + (["POOL"] if several else []) + ["CLIENT", "SERVER", "STATE", "AGE",
                                                            "BYTES IN", "BYTES OUT"]
        return (table(headers, rows)
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
    p.add_argument("--pool", help="drain/ready/down: the pool (its [BALANCE_*] section) when several "
                                  "have a server of that ID; recycle/discard/scale: when several "
                                  "pools have managed nodes")
    p.add_argument("command", choices=["status", "servers", "sessions", "drain", "ready", "down", "close",
                                       "nodes", "recycle", "discard", "scale", "reload", "hash-token"])
    p.add_argument("arg", nargs="?", help="server ID, session id, node id, MIN_NODES for scale, "
                                          "or page number for sessions")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    """Do what *argv* says; 0, or :class:`CtlError` (argparse exits 2 on its own usage errors)."""
    args = parser().parse_args(argv)
    if args.command == "hash-token":
        token = sys.stdin.readline().strip() if args.stdin else new_token()
        if len(token) < 16:
            raise usage_error("the token must be at least 16 characters")
        if not args.stdin:
            print(f"token (give it to admins; not stored anywhere): {token}")
        print(f"TOKEN_HASH = {hash_token(token)}")
        return 0
    url = check_url(args.url)
    token = check_token(args.token, "--token")
    if args.token_file:
        token = check_token(read_token_file(args.token_file), f"--token-file {args.token_file}")
    needs = {"close": "a session id", "recycle": "a node id", "discard": "a node id",
             "scale": "MIN (the number of nodes to keep)"}
    if args.command in ("drain", "ready", "down", "close", "recycle", "discard", "scale") and not args.arg:
        raise usage_error(f"{args.command} needs {needs.get(args.command, 'a server ID')}")
    pool = "?" + urllib.parse.urlencode({"pool": args.pool}) if args.pool else ""
    if args.command == "status" or args.command == "nodes":
        method, path = "GET", "/api/v1/status"
    elif args.command == "servers":
        method, path = "GET", "/api/v1/servers"
    elif args.command == "sessions":
        page = args.arg or "1"
        if not page.isdigit():
            raise usage_error(f"sessions: page must be a number, got {page!r}")
        method, path = "GET", f"/api/v1/sessions?page={page}"
    elif args.command in ("recycle", "discard"):
        if not (args.arg.isascii() and args.arg.isdigit()):
            raise usage_error(f"{args.command}: node id must be a number, got {args.arg!r}")
        method, path = "POST", f"/api/v1/nodes/{args.arg}/{args.command}{pool}"
    elif args.command == "scale":
        if not (args.arg.isascii() and args.arg.isdigit()):
            raise usage_error(f"scale: MIN must be a whole number, got {args.arg!r}")
        method, path = "POST", "/api/v1/nodes/scale?" + urllib.parse.urlencode(
            {"min": args.arg, **({"pool": args.pool} if args.pool else {})})
    elif args.command == "reload":
        method, path = "POST", "/api/v1/reload"
    elif args.command == "close":
        method, path = "POST", f"/api/v1/sessions/{urllib.parse.quote(args.arg)}/close"
    else:
        method, path = "POST", f"/api/v1/servers/{urllib.parse.quote(args.arg, safe='')}/{args.command}{pool}"
    body = call(url, token, method, path)
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    try:
        text = render(args.command, body, args.arg)
    except (KeyError, TypeError, AttributeError, ValueError):  # JSON, but not the broker's API
        raise CtlError(f"{url} answered {method} {path} with JSON that is not the broker's "
                       "(another service on that port?)") from None
    print(text)
    return 0


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: Sequence[str] | None = None) -> None:
    """The command: one line on stderr and exit status 1 or 2 for any failure, never a traceback."""
    try:
        status = run(argv)
    except CtlError as exc:
        print(f"protheus-broker-ctl: {_one_line(str(exc))}", file=sys.stderr)
        status = exc.status
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        status = 0
    except Exception as exc:  # a bug: still one line, with what it was
        print(f"protheus-broker-ctl: unexpected error: {type(exc).__name__}: {_one_line(str(exc))}",
              file=sys.stderr)
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
