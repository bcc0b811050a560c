"""``python -m protheus_broker.demo.run``: the broker on etc/demo.ini with its sample AppServers: a
SmartClient sim per REMOTE_SERVER of the desktop section, an HTTP sim (``--http``) per REMOTE_SERVER of
``[BALANCE_HTTP]``.

Everything it starts is stopped, by pid, on Ctrl-C (or if any of them exits).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import defer, task

from protheus_broker.demo.children import TwistdChild, spawn, twistd_argv
from protheus_broker.config import load_config
from protheus_broker.ini import Section, host_and_port, read_file, read_ini

HTTP_SECTION = "BALANCE_HTTP"

DEMO_INI = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "etc", "demo.ini")
NODES_INI = os.path.join(os.path.dirname(DEMO_INI), "demo-nodes.ini")


def prepare_ini(ini: str, run_dir: str) -> str:
    """The demo's placeholders, filled in: ``{python}`` (this Python, so NODE_COMMAND works from a
    clone) and ``{rundir}`` (*run_dir*, for sockets and locks).  Without them, *ini* itself;
    else a copy in *run_dir*.  Other braces ({id}, {port}...) are the broker's."""
    text = read_file(ini)
    if "{python}" not in text and "{rundir}" not in text:
        return ini
    text = text.replace("{python}", shlex.quote(sys.executable)).replace("{rundir}", run_dir)
    path = os.path.join(run_dir, os.path.basename(ini))
    with open(path, "w") as handle:
        handle.write(text)
    return path


def managed_nodes(config: Any) -> list[str]:
    """'[SECTION] MIN..MAX nodes over TRANSPORT' for each unit with managed nodes."""
    lines = []
    for name, unit in config.units:
        nodes = getattr(unit, "nodes", None)
        if nodes is not None:
            lines.append(f"[{name}] {nodes.min_nodes}..{nodes.max_nodes} nodes over {nodes.transport.value}"
                         + (", one persistent" if nodes.persistent else ""))
    return lines


def _print(name: str, line: bytes) -> None:
    sys.stdout.write(f"{name:>8} | {line.decode(errors='replace')}\n")
    sys.stdout.flush()


def stop_all(reactor: Any, children: list[TwistdChild], grace: float = 5.0) -> defer.Deferred[Any]:
    """SIGTERM each child by pid, SIGKILL any still there after *grace* seconds; wait for all."""
    for child in children:
        child.signal("TERM")
    def kill() -> None:
        for child in children:
            child.signal("KILL")

    killer = reactor.callLater(grace, kill)
    done = defer.DeferredList([c.ended for c in children])
    done.addBoth(lambda result: killer.cancel() if killer.active() else None)
    return done


def screen_url(endpoint: str) -> str:
    """``http://host:port/`` for a ``tcp:PORT:interface=HOST`` endpoint (as the demo has)."""
    parts = endpoint.split(":")
    options = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    return f"http://{options.get('interface', '127.0.0.1')}:{parts[1]}/"


def http_servers(ini: str) -> tuple[str | None, list[tuple[str, str, int]]]:
    """The ``[BALANCE_HTTP]`` section's listening address (``host:port``) and its REMOTE_SERVERs as
    ``(id, host, port)``; ``(None, [])`` without the section. Read here from the ini itself, so the
    demo does not depend on how the broker's unit stores them."""
    raw, where = read_ini(read_file(ini), ini)
    if HTTP_SECTION not in raw.sections:
        return None, []
    section = Section(ini, HTTP_SECTION, dict(raw[HTTP_SECTION]), where)
    servers = [(key[len("REMOTE_SERVER_"):], *host_and_port(section, key))
               for key in section.values if key.startswith("REMOTE_SERVER_")]
    listen = f"{section.text('LOCAL_SERVER_INTERFACE', '127.0.0.1')}:{section.text('LOCAL_SERVER_PORT', '?')}"
    return listen, servers


async def run_demo(reactor: Any, ini: str = DEMO_INI) -> int:
    run_dir = tempfile.mkdtemp(prefix="protheus-demo-")  # short: Unix socket paths are <= 107 bytes
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, run_dir, True)
    ini = prepare_ini(ini, run_dir)
    config = load_config(ini)
    nodes = managed_nodes(config)
    children: list[TwistdChild] = []
    reactor.addSystemEventTrigger("before", "shutdown", stop_all, reactor, children)
    try:
        for server in config.desktop.servers:
            child = TwistdChild(f"sim-{server.server_id}", _print)
            spawn(reactor, child, twistd_argv("protheus-appserver-sim", "--name", f"appserver-{server.server_id}",
                                              "--port", f"tcp:{server.port}:interface={server.host}"))
            children.append(child)
        web_address, web_servers = http_servers(ini)
        for server_id, host, server_port in web_servers:
            child = TwistdChild(f"web-{server_id}", _print)
            spawn(reactor, child, twistd_argv("protheus-appserver-sim", "--http", "--name", f"webapp-{server_id}",
                                              "--port", f"tcp:{server_port}:interface={host}"))
            children.append(child)
        broker = TwistdChild("broker", _print)
        spawn(reactor, broker, twistd_argv("protheus-broker", "--config", ini))
        children.append(broker)
        port = await defer.gatherResults([c.listening() for c in children], consumeErrors=True)
        host = config.desktop.local_interface or "127.0.0.1"
        sys.stdout.write(
            f"\nDemo running: broker on {host}:{port[-1]} -> "
            + (f"{len(config.desktop.servers)} sample AppServers" if config.desktop.servers else "")
            + (f"{'; ' if config.desktop.servers else ''}managed nodes (the broker starts, polls and recycles "
               f"them): {'; '.join(nodes)}" if nodes else "") + ".\n"
            f"Try:  nc {host} {port[-1]}     (the first line names the AppServer you landed on;\n"
            f"      type a line and it echoes; open several to watch the balancing)\n"
            + (f"Web:  http://{web_address}/   ([BALANCE_HTTP] over "
               f"{f'{len(web_servers)} sample HTTP AppServers' if web_servers else 'its nodes'}:\n"
               f"      reload and the session counter grows on the same server; the page holds a WebSocket)\n"
               if web_address else "")
            + (f"Broker screen: {screen_url(config.admin.endpoint)}\n" if config.admin else "")
            + "Ctrl-C stops everything.\n\n"
        )
        sys.stdout.flush()
        await defer.DeferredList([c.ended for c in children], fireOnOneCallback=True)
        return 1  # a child exited on its own
    except defer.FirstError as error:
        sys.stderr.write(f"demo: {error.subFailure.getErrorMessage()}\n")
        return 1
    finally:
        await stop_all(reactor, children)


def main() -> None:
    args = sys.argv[1:]
    ini = NODES_INI if args == ["--nodes"] else args[0] if args else DEMO_INI
    task.react(lambda reactor: defer.ensureDeferred(run_demo(reactor, ini)).addCallback(
        lambda code: sys.exit(code) if code else None))


if __name__ == "__main__":
    main()
