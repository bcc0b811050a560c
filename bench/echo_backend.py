"""A small, fast echo server for the benchmark: one process, one epoll loop, no framework.

``python bench/echo_backend.py [PORT]`` listens on 127.0.0.1 (port 0: any free port), prints
``echo-backend listening on 127.0.0.1:PORT`` and echoes every byte back until the peer sends EOF,
then closes.  It exists so that the session-rate and latency figures measure the proxy, not a
Twisted backend: the sample AppServer (``protheus-appserver-sim``) spends more CPU per connection
than this loop.  What cannot be sent at once is kept and reading stops until it is flushed
(backpressure), so memory stays bounded.
"""

from __future__ import annotations

import resource
import select
import socket
import sys


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    print(f"echo-backend listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)

    EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    epoll = select.epoll()
    lfd = listener.fileno()
    epoll.register(lfd, EPOLLIN)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}

    def close(fd: int) -> None:
        epoll.unregister(fd)
        pending.pop(fd, None)
        conns.pop(fd).close()

    while True:
        for fd, events in epoll.poll():
            if fd == lfd:
                for _ in range(128):
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE and friends: try again on the next turn
                        break
                    conn.setblocking(False)
                    conn.setsockopt(*nodelay)
                    cfd = conn.fileno()
                    conns[cfd] = conn
                    epoll.register(cfd, EPOLLIN)
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            if fd in pending:  # EPOLLOUT (or an error): flush what is left
                data = pending[fd]
                try:
                    sent = conn.send(data)
                except BlockingIOError:
                    continue
                except OSError:
                    close(fd)
                    continue
                if sent < len(data):
                    pending[fd] = data[sent:]
                    continue
                del pending[fd]
                epoll.modify(fd, EPOLLIN)
                continue
            try:
                data = conn.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                close(fd)
                continue
            if not data:
                close(fd)
                continue
            try:
                sent = conn.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                close(fd)
                continue
            if sent < len(data):
                pending[fd] = data[sent:]
                epoll.modify(fd, EPOLLOUT)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
