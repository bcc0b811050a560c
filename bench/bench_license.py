"""The license gate's cost: requests/s and p50/p99 through one ``[BALANCE_WEB_SERVICES]`` unit for a
path under a ``Stateless=1`` URI (each request takes and gives back a license seat) versus a path
under a ``Stateless=0`` URI (no seat), in the same run, against nginx, 127.0.0.1 only.

``make bench-license`` (or ``PYTHONPATH=. python bench/bench_license.py``).  One broker process,
one unit, two URI sections (``[APP] URL=/rest Stateless=1`` and ``[OPEN] URL=/open Stateless=0``);
wrk (one thread, keep-alive connections) loads ``/rest/small.html`` and ``/open/small.html`` in
interleaved rounds (the order alternates each round); medians are reported, and the gated/ungated
ratios are the medians of the per-round ratios.  Targets (issue 15): < 1 ms added p50 (aim < 50 µs),
< 5 % of requests/s lost; the seed's AppServer-side license on demand costs 50-80 ms and ~20 %.

The license server is ``twistd protheus-license`` (``--fake-license``: bench/fake_license_server.py,
tests/license_fake.py's server side of license/protocol.py).  Before measuring, the bench checks that the
gate is live: a trusted ``x-totvs-appcode: NOPE`` on /rest gets 503 "no license for application NOPE".
Every child (nginx, the license server, the broker) is stopped by pid, also on Ctrl-C.  The table goes
to stdout and to bench/results/license-latest.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench as base  # noqa: E402
import bench_http  # noqa: E402

HOST = base.HOST
LEGS = ("ungated", "gated")
PATHS = {"ungated": "/open/small.html", "gated": "/rest/small.html"}
SECRET = b"bench-license-secret-0123456789\n"


def say(text: str = "") -> None:
    print(text, flush=True)


def start_backend(children: base.Children) -> int:
    """nginx (bench_http's config) with small.html also under /rest and /open."""
    port, _ = bench_http.start_nginx(children)
    root = children.workdir / "www"
    for folder in ("rest", "open"):
        (root / folder).mkdir()
        (root / folder).chmod(0o755)
        shutil.copy(root / "small.html", root / folder / "small.html")
        (root / folder / "small.html").chmod(0o644)
    return port


def start_license_server(children: base.Children, seats: int, fake: bool) -> int:
    """protheus-license (``twistd protheus-license``, its journal in the temp directory), or with
    *fake* the stand-in of bench/fake_license_server.py."""
    secret = children.workdir / "license.secret"
    secret.write_bytes(SECRET)
    if fake:
        proc, log_path = children.start("license-server", [base.PY, str(HERE / "fake_license_server.py"),
                                                           "--port", "0", "--secret-file", str(secret),
                                                           "--seats", str(seats)])
        return base.wait_logged_port(proc, log_path)
    ini = children.workdir / "license.ini"
    ini.write_text(f"[LicenseServer]\nINTERFACE = {HOST}\nPORT = 0\nSTATUS_PORT = 0\nSTATUS_INTERFACE = {HOST}\n"
                   f"SECRET_FILE = {secret}\nJOURNAL = {children.workdir / 'license.journal'}\n"
                   f"[Licenses]\nTOTVS_I = {seats}\n")
    proc, log_path = children.start("license-server", base.twistd("protheus-license", "--config", str(ini)))
    return base.wait_logged_port(proc, log_path)


def start_broker(children: base.Children, backend_port: int, license_port: int,
                 args: argparse.Namespace) -> base.Target:
    port = base.free_port()
    ini = children.workdir / "broker-license.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\nLOCAL_SERVER_PORT = 0\nLOCAL_SERVER_INTERFACE = 127.0.0.1\n"
        f"REMOTE_SERVER_01 = {HOST} {backend_port}\nSORT_METHOD = ROUND_ROBIN\nMONITORING_TYPE = DISABLED\n"
        "\n[BALANCE_WEB_SERVICES]\n"
        f"LOCAL_SERVER_PORT = {port}\nLOCAL_SERVER_INTERFACE = {HOST}\n"
        f"REMOTE_SERVER_01 = {HOST} {backend_port}\n"
        "SORT_METHOD = ROUND_ROBIN\nMONITORING_TYPE = DISABLED\nACCESS_LOG = 0\n"
        "URIS = APP, OPEN\nTRUSTED_API_MANAGERS = 127.0.0.1\n"
        "\n[APP]\nURL=/rest\nStateless=1\n"
        "\n[OPEN]\nURL=/open\nStateless=0\n"
        f"\n[LICENSECLIENT]\nSERVER = {HOST}\nPORT = {license_port}\n"
        f"SECRET_FILE = {children.workdir / 'license.secret'}\n"
        f"LOW_WATERMARK = {args.low}\nHIGH_WATERMARK = {args.high}\n"
    )
    proc, log_path = children.start("broker-license", base.twistd("protheus-broker", "--config", str(ini)))
    base.wait_logged_port(proc, log_path)
    base.wait_listening(proc, port, log_path, timeout=10)
    return base.Target("broker", port, proc)


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_gate(port: int) -> None:
    """The gate is live on /rest and absent on /open (else the comparison means nothing)."""
    for _ in range(100):  # the license channel comes up within a few hundred ms
        status, body = get(port, PATHS["gated"])
        if status == 200:
            break
        time.sleep(0.1)
    if status != 200:
        raise RuntimeError(f"/rest answers {status}: {body[:200]!r}")
    status, body = get(port, PATHS["gated"], {"x-totvs-appcode": "NOPE"})
    reason = json.loads(body).get("error") if status == 503 else None
    if reason != "no license for application NOPE":
        raise RuntimeError(f"the gate is not live on /rest: {status} {body[:200]!r}")
    status, _ = get(port, PATHS["ungated"], {"x-totvs-appcode": "NOPE"})
    if status != 200:
        raise RuntimeError(f"/open is gated: {status}")
    say("gate live: /rest takes seats (503 'no license for application NOPE' for an unknown code), /open does not")


def micro(count: int = 200_000) -> dict[str, float]:
    """In this process, no I/O: µs per ``LicenseGate.choose`` + ``abandoned`` for a gated and an
    ungated path over a dispatcher that answers at once, with seats in the local pool (what the gate
    adds to a request, free of the machine's noise)."""
    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock

    from protheus_broker.http.gate import LicenseGate
    from protheus_broker.http.proxy import Choice, RequestInfo
    from protheus_broker.http.settings import LicenseGateConfig, UriRule
    from protheus_broker.license.pool import SeatPool

    class Inner:
        strip_request_headers: frozenset[bytes] = frozenset()

        def choose(self, request: Any) -> Any:
            return succeed(Choice([None], {}))

        def abandoned(self, choice: Any) -> None:
            pass

    class Wire:
        connected = True

    clock = Clock()
    pool = SeatPool(clock, Wire(), low=1, high=64)
    pool.adopt([{"lease_id": "L1", "license_class": "TOTVS_I", "seats": 64, "ttl": 1e9}])
    config = LicenseGateConfig(uris=(UriRule("APP", "/rest", True), UriRule("OPEN", "/open", False)))
    gate = LicenseGate(clock, Inner(), pool, config)
    headers = [(b"host", b"app"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
    result: dict[str, float] = {}
    for leg in LEGS:
        request = RequestInfo(b"GET", PATHS[leg].encode(), headers, "127.0.0.1")
        chosen: list[Any] = []
        started = time.perf_counter()
        for _ in range(count):
            gate.choose(request).addCallback(chosen.append)
            gate.abandoned(chosen.pop())
        result[leg] = 1e6 * (time.perf_counter() - started) / count
    return result


def run(args: argparse.Namespace, children: base.Children) -> dict[str, Any]:
    figures = micro()
    say(f"in process: gate choose+abandoned {figures['gated']:.2f} µs gated, {figures['ungated']:.2f} µs ungated")
    backend_port = start_backend(children)
    license_port = start_license_server(children, args.seats, args.fake_license)
    broker = start_broker(children, backend_port, license_port, args)
    check_gate(broker.port)
    res: dict[str, Any] = {"micro": figures}
    for leg in LEGS:
        bench_http.run_wrk(broker, PATHS[leg], args, args.warmup, None)
    for round_no in range(args.rounds):
        order = LEGS if round_no % 2 == 0 else tuple(reversed(LEGS))
        for leg in order:
            result = bench_http.run_wrk(broker, PATHS[leg], args, args.seconds, None)
            for key, value in result.items():
                res.setdefault(key, {}).setdefault(leg, []).append(value)
            say(f"round {round_no + 1}/{args.rounds} {leg:>7}: {result['rps']:9.0f} req/s  "
                f"p50 {result.get('p50', 0):8.0f} µs  p99 {result.get('p99', 0):8.0f} µs"
                + (f"  cpu {result['cpu_us']:6.1f} µs/req" if "cpu_us" in result else "")
                + (f"  ERRORS {result['errors']:.0f}" if result["errors"] else ""))
    return res


def table(res: dict[str, Any], args: argparse.Namespace) -> str:
    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    rows = []
    for text, key, spec in (("requests/s", "rps", ".0f"), ("latency p50, µs", "p50", ".0f"),
                            ("latency p99, µs", "p99", ".0f"), ("broker CPU per request, µs", "cpu_us", ".1f"),
                            ("errors (non-2xx, socket)", "errors", ".0f")):
        values = res.get(key, {})
        rows.append(f"| {text} | {fmt(med(values.get('ungated', [])), spec)} | "
                    f"{fmt(med(values.get('gated', [])), spec)} |")
    rps = res.get("rps", {})
    p50 = res.get("p50", {})
    loss = med([100.0 * (1 - g / u) for u, g in zip(rps.get("ungated", []), rps.get("gated", [])) if u])
    added = med([g - u for u, g in zip(p50.get("ungated", []), p50.get("gated", []))])
    verdicts = [
        f"| **added p50, µs** (gated − ungated, per round) | | {fmt(added, '.0f')} | < 1000 (aim < 50): "
        f"{'met' if added is not None and added < 1000 else '**missed**'} |",
        f"| **requests/s lost, %** (per round) | | {fmt(loss, '.1f')} | < 5: "
        f"{'met' if loss is not None and loss < 5 else '**missed**'} |",
    ]
    cpu = res.get("cpu_us", {})
    cpu_added = med([100.0 * (g / u - 1) for u, g in zip(cpu.get("ungated", []), cpu.get("gated", [])) if u])
    verdicts.append(f"| broker CPU per request added, % (per round; the requests/s a CPU-bound broker loses) | | "
                    f"{fmt(cpu_added, '.1f')} | < 5: {'met' if cpu_added is not None and cpu_added < 5 else '**missed**'} |")
    figures = res.get("micro", {})
    if figures:
        verdicts.append(f"| in process, no I/O: gate choose + abandoned per request, µs | {figures['ungated']:.2f} | "
                        f"{figures['gated']:.2f} | (the gate's own cost) |")
    head = "| figure | ungated (/open, Stateless=0) | gated (/rest, Stateless=1) | target |\n|---|---:|---:|---|"
    notes = [
        f"Medians of {args.rounds} interleaved rounds of `wrk -t1 -c{args.connections} -d{args.seconds:g}s` per "
        f"path, on 127.0.0.1; {os.cpu_count()} CPUs shared by wrk, the broker, nginx and the license server "
        f"(load {os.getloadavg()[0]:.2f} at the end: requests/s and p99 move with other work on the machine; "
        "the broker's CPU per request and the in-process figure do not).",
        "One broker, one `[BALANCE_WEB_SERVICES]` unit (ACCESS_LOG = 0), `URIS = APP, OPEN`; the gated path takes "
        f"and gives back one TOTVS_I seat per request from the local pool (LOW_WATERMARK = {args.low}, "
        f"HIGH_WATERMARK = {args.high}); the ungated one still passes the gate's path match.",
        (f"License server: bench/fake_license_server.py (tests/license_fake.py, the server side of "
         f"license/protocol.py), {args.seats} TOTVS_I seats, TTL 30 s." if args.fake_license else
         f"License server: `twistd protheus-license` (journal in the temp directory), {args.seats} TOTVS_I "
         "seats, LEASE_TTL 30 s, MAX_SEATS_PER_LEASE 100."),
        f"Backend: nginx {bench_http.NGINX_VERSION}, 612 B file; Python {platform.python_version()}, "
        f"Twisted {base.TWISTED_VERSION}.",
    ]
    return head + "\n" + "\n".join(rows + verdicts) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--seconds", type=float, default=3, help="wrk -d per run")
    parser.add_argument("--warmup", type=float, default=1, help="wrk -d of the warm-up run per path")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (keep-alive connections)")
    parser.add_argument("--seats", type=int, default=10000, help="TOTVS_I seats at the license server")
    parser.add_argument("--fake-license", action="store_true",
                        help="the stand-in license server (bench/fake_license_server.py), not protheus-license")
    parser.add_argument("--low", type=int, default=16, help="LOW_WATERMARK")
    parser.add_argument("--high", type=int, default=64, help="HIGH_WATERMARK")
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    args = parser.parse_args()
    for name, path, package in (("nginx", args.nginx, "nginx-light"), ("wrk", args.wrk, "wrk")):
        if not os.access(path, os.X_OK):
            sys.exit(f"bench-license: {name} not found ({path}); apt-get install {package}")
    bench_http.NGINX, bench_http.WRK = args.nginx, args.wrk
    nginx_v = subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr
    bench_http.NGINX_VERSION = nginx_v.strip().rsplit("/", 1)[-1] or "?"
    import twisted
    base.TWISTED_VERSION = twisted.__version__
    base._raise_nofile()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    return base.run_and_report("bench-license", f"nginx {bench_http.NGINX_VERSION}, wrk",
                               lambda children: run(args, children), lambda res: table(res, args),
                               "license-latest.md")


if __name__ == "__main__":
    sys.exit(main())
