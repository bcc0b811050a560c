"""``python -m protheus_broker.demo.run``: the broker on etc/demo.ini with three sample AppServers.

Everything it starts is stopped, by pid, on Ctrl-C (or if any of them exits).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import defer, task

from protheus_broker.demo.children import TwistdChild, spawn, twistd_argv
from protheus_broker.config import load_config

DEMO_INI = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "etc", "demo.ini")


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


async def run_demo(reactor: Any, ini: str = DEMO_INI) -> int:
    config = load_config(ini)
    children: list[TwistdChild] = []
    reactor.addSystemEventTrigger("before", "shutdown", stop_all, reactor, children)
    try:
        for server in config.desktop.servers:
            child = TwistdChild(f"sim-{server.server_id}", _print)
            spawn(reactor, child, twistd_argv("protheus-appserver-sim", "--name", f"appserver-{server.server_id}",
                                              "--port", f"tcp:{server.port}:interface={server.host}"))
            children.append(child)
        broker = TwistdChild("broker", _print)
        spawn(reactor, broker, twistd_argv("protheus-broker", "--config", ini))
        children.append(broker)
        port = await defer.gatherResults([c.listening() for c in children], consumeErrors=True)
        host = config.desktop.local_interface or "127.0.0.1"
        sys.stdout.write(
            f"\nDemo running: broker on {host}:{port[-1]} -> {len(children) - 1} sample AppServers.\n"
            f"Try:  nc {host} {port[-1]}     (the first line names the AppServer you landed on;\n"
            f"      type a line and it echoes; open several to watch the balancing)\n"
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
    ini = sys.argv[1] if len(sys.argv) > 1 else DEMO_INI
    task.react(lambda reactor: defer.ensureDeferred(run_demo(reactor, ini)).addCallback(
        lambda code: sys.exit(code) if code else None))


if __name__ == "__main__":
    main()
