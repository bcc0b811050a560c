"""The eager-send adapter for TCP transports, shared by every relay (SmartClient sessions,
resumable links, the connector): TCP_NODELAY, a larger read size, and sending at once when nothing
is queued.

The adapter is two calls.  :func:`tune` once per connection (in ``connectionMade``) says whether
the transport allows eager sends; the relay then writes with :func:`send_now` if it does and with
``transport.write`` if not (a TLS transport, a test transport, a Twisted without the internals
``send_now`` reads).  Its promises, tested in ``tests/test_sockets.py``: bytes leave in the order
they were given, whatever the kernel takes; nothing overtakes queued bytes; an error on the socket
is left to the transport, which meets it on its next write and reports it as usual; a transport
that is closing or half-closed is written to as ``transport.write`` would.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport

#: Bytes read per socket read: 256 KiB measured best for bulk (../shared/PERF_NOTES.md).  It is
#: also Twisted's write-buffer mark for pausing the producer, so it bounds per-session buffering.
READ_SIZE = 256 * 1024

#: The FileDescriptor internals send_now reads (the same in Twisted 22.4 and 26).
_EAGER_NEEDS = ("_tempDataLen", "offset", "dataBuffer", "socket", "connected", "_writeDisconnecting",
                "disconnecting")


def tune(transport: ITransport) -> bool:
    """TCP_NODELAY and the larger read size; True if the transport allows eager sends.

    Only a plain ``tcp.Connection`` does: not one that started TLS (its bytes must go through
    OpenSSL), and not one of a Twisted whose internals differ (it falls back to plain writes).
    """
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)
        except OSError:
            pass
    if isinstance(transport, tcp.Connection):
        transport.bufferSize = READ_SIZE
        if getattr(transport, "TLS", False):
            return False
        return all(hasattr(transport, name) for name in _EAGER_NEEDS)
    return False


def send_now(transport: Any, data: bytes) -> None:
    """Write *data* to a TCP transport that :func:`tune` accepted, sending at once when nothing
    is queued.

    ``transport.write`` only queues: bytes leave on the next reactor turn.  Sending straight away
    when the queue is empty keeps order (nothing is ahead of us) and saves that turn, which is most
    of the added latency of a Python proxy.  What the kernel does not take is queued as usual, so
    backpressure is unchanged.  A closing or half-closed transport is left to ``transport.write``,
    and so is a socket error: the transport meets it again when it flushes and reports it.
    """
    if (
        not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            transport.write(data)  # the transport meets the same error and reports it
            return
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
