"""HTTP keep-alive through protheus-broker ``[BALANCE_HTTP]`` vs HAProxy 2.6 (``mode http``) vs direct,
against nginx, 127.0.0.1 only.

``make bench-http`` (or ``PYTHONPATH=. python bench/bench_http.py``).  nginx (one worker, its own
config in a temporary directory) serves a small file and a 1 MB file; ``wrk`` (one thread, keep-alive
connections) loads each through each target, in interleaved rounds (the order of the targets
rotates each round); medians are reported, and the broker/HAProxy ratios are the medians of the
per-round ratios.  Figures per file: requests/s, latency p50/p99 and the p50 each proxy adds over
direct, MB/s, and the proxy's CPU per request (user + system time of its process over the run,
divided by the requests wrk completed).

Both proxies get the same setup: one server, round robin, the affinity cookie ``TOTVS_BROKER_SH_001``
inserted by the proxy (HAProxy: ``cookie TOTVS_BROKER_SH_001 insert``, ``server … cookie s1
maxconn N``), and by default wrk sends back the cookie the proxy set (a browser session's steady
state; ``--no-cookie`` measures first requests, each balanced and answered with Set-Cookie).

The broker runs twice: with ACCESS_LOG = 1 (its default: one access-log line per request, written
to its log file) and with ACCESS_LOG = 0 (HAProxy, configured as here, logs nothing); both get a
broker/HAProxy ratio.  ``--no-nolog`` leaves the second one out.

If the broker does not serve ``[BALANCE_HTTP]`` yet, its leg is skipped with one line.  Every child
(nginx, HAProxy, the broker) is stopped by pid, also on Ctrl-C.  The table goes to stdout and to
bench/results/http-latest.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench as base  # noqa: E402  (bench/bench.py: child processes, meters, helpers)

HOST = base.HOST
TARGETS = ("direct", "broker", "broker-nolog", "haproxy")
BROKERS = ("broker", "broker-nolog")  # ACCESS_LOG = 1 (the default) and ACCESS_LOG = 0
HEADINGS = {"direct": "direct", "broker": "broker", "broker-nolog": "broker, ACCESS_LOG=0", "haproxy": "HAProxy"}
COOKIE = "TOTVS_BROKER_SH_001"
FILES = {"small": ("small.html", 612), "1MB": ("1mb.bin", 1024 * 1024)}
GOALS = {  # figure -> (comparison, bound) on broker / HAProxy, from the issue
    "rps": (">=", 0.5),
    "added_p50": ("<=", 2.0),
    "mbps": (">=", 0.8),
}
NOT_SUPPORTED = re.compile(rb"\[BALANCE_HTTP\][^\n]*not supported")


# --- children -----------------------------------------------------------------------------------

def start_nginx(children: base.Children) -> tuple[int, subprocess.Popen[bytes]]:
    """nginx in the foreground, one worker, serving the two files from its own temp directory."""
    root = children.workdir / "www"
    root.mkdir()
    # nginx's worker drops to `nobody` when started as root: it must be able to read the files
    for path in (children.workdir, root):
        path.chmod(0o755)
    (root / FILES["small"][0]).write_bytes(b"<!DOCTYPE html>\n" + b"x" * (FILES["small"][1] - 16))
    (root / FILES["1MB"][0]).write_bytes(os.urandom(FILES["1MB"][1]))
    port = base.free_port()
    tmp = children.workdir
    conf = tmp / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    sendfile on;
    server {{ listen {HOST}:{port}; root {root}; }}
}}
""")
    proc, log_path = children.start("nginx", [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    base.wait_listening(proc, port, log_path)
    for file_name, size in FILES.values():
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        connection.request("GET", "/" + file_name)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        if response.status != 200 or len(body) != size:
            raise RuntimeError(f"nginx answers /{file_name} with {response.status}, {len(body)} bytes:\n"
                               f"{base._tail(children.workdir / 'nginx-error.log')}")
    return port, proc


def start_haproxy(children: base.Children, backend_port: int, maxconn: int) -> base.Target:
    """HAProxy in the foreground (-db), one thread, ``mode http``, the affinity cookie inserted."""
    port = base.free_port()
    cfg = children.workdir / "haproxy-http.cfg"
    cfg.write_text("\n".join([
        "global", "    nbthread 1", "    maxconn 9000",
        "defaults", "    mode http", "    maxconn 9000",
        "    timeout connect 5s", "    timeout client 2m", "    timeout server 2m",
        "    timeout http-keep-alive 2m",
        "frontend fe", f"    bind {HOST}:{port}", "    default_backend be",
        "backend be", "    balance roundrobin", f"    cookie {COOKIE} insert",
        f"    server s1 {HOST}:{backend_port} cookie s1 maxconn {maxconn}",
    ]) + "\n")
    proc, log_path = children.start("haproxy-http", [HAPROXY, "-db", "-f", str(cfg)])
    base.wait_listening(proc, port, log_path)
    return base.Target("haproxy", port, proc)


def start_broker(children: base.Children, backend_port: int, name: str = "broker",
                 access_log: bool = True) -> base.Target | str:
    """The broker with a ``[BALANCE_HTTP]`` section over nginx; a reason text if it does not serve it.
    *access_log* False sets ACCESS_LOG = 0 (HAProxy, as configured here, logs nothing either)."""
    port = base.free_port()
    ini = children.workdir / f"{name}-http.ini"
    ini.write_text(
        "[BALANCE_SMART_CLIENT_DESKTOP]\n"
        "LOCAL_SERVER_PORT = 0\n"
        f"LOCAL_SERVER_INTERFACE = {HOST}\n"
        f"REMOTE_SERVER_01 = {HOST} {backend_port}\n"
        "SORT_METHOD = ROUND_ROBIN\n"
        "MONITORING_TYPE = DISABLED\n"
        "\n[BALANCE_HTTP]\n"
        f"LOCAL_SERVER_PORT = {port}\n"
        f"LOCAL_SERVER_INTERFACE = {HOST}\n"
        f"REMOTE_SERVER_01 = {HOST} {backend_port}\n"
        "SORT_METHOD = ROUND_ROBIN\n"
        "MONITORING_TYPE = DISABLED\n"
        f"ACCESS_LOG = {1 if access_log else 0}\n"
    )
    proc, log_path = children.start(f"{name}-http", base.twistd("protheus-broker", "--config", str(ini)))
    base.wait_logged_port(proc, log_path)  # the desktop port: the broker is up
    if NOT_SUPPORTED.search(log_path.read_bytes()):
        children.stop(proc)
        return "this broker does not serve [BALANCE_HTTP] yet (it logs: not supported yet; ignored)"
    try:
        base.wait_listening(proc, port, log_path, timeout=10)
    except RuntimeError:
        children.stop(proc)
        return f"this broker does not listen on its [BALANCE_HTTP] port:\n{base._tail(log_path)}"
    return base.Target(name, port, proc)


# --- measurement --------------------------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
_BYTES = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests, requests/s, p50/p99 (µs), bytes/s and errors from ``wrk --latency`` output."""
    result: dict[str, float] = {}
    for q in ("50", "99"):
        match = re.search(rf"^\s+{q}%\s+(\S+)", output, re.M)
        if match:
            result[f"p{q}"] = _duration_us(match.group(1))
    match = re.search(r"^\s+(\d+) requests in", output, re.M)
    result["requests"] = float(match.group(1)) if match else 0.0
    match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    result["rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"^Transfer/sec:\s+([\d.]+)(\w+)", output, re.M)
    result["bps"] = float(match.group(1)) * _BYTES.get(match.group(2), 1) if match else 0.0
    errors = 0.0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        errors += float(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        errors += sum(float(g) for g in match.groups())
    result["errors"] = errors
    return result


def cookie_for(port: int, path: str) -> str | None:
    """The affinity cookie a proxy sets on a first request (``name=value``), or None."""
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        for name, value in response.getheaders():
            if name.lower() == "set-cookie" and value.startswith(COOKIE + "="):
                return value.split(";", 1)[0]
        return None
    finally:
        connection.close()


def run_wrk(target: base.Target, path: str, args: argparse.Namespace, seconds: float,
            cookie: str | None) -> dict[str, float]:
    """One wrk run against *target*; the proxy's CPU per request beside it."""
    argv = [WRK, "-t", "1", "-c", str(args.connections), "-d", f"{seconds:g}s", "--latency",
            "--timeout", "10s"]
    if cookie:
        argv += ["-H", f"Cookie: {cookie}"]
    argv.append(f"http://{HOST}:{target.port}{path}")
    with base.CpuMeter(target.pid) as cpu:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed against {target.name}: {done.stderr.strip() or done.stdout}")
    result = parse_wrk(done.stdout)
    if target.pid is not None and result["requests"]:
        result["cpu_us"] = 1e6 * cpu.seconds / result["requests"]
    return result


def say(text: str = "") -> None:
    print(text, flush=True)


def run(args: argparse.Namespace, children: base.Children) -> dict[str, Any]:
    nginx_port, _ = start_nginx(children)
    targets: dict[str, base.Target] = {"direct": base.Target("direct", nginx_port, None)}
    res: dict[str, Any] = {"skipped": {}}
    targets["haproxy"] = start_haproxy(children, nginx_port, args.maxconn)
    for name in BROKERS:
        if name == "broker-nolog" and args.no_nolog:
            broker: base.Target | str = "--no-nolog given"
        else:
            broker = (start_broker(children, nginx_port, name, access_log=name == "broker")
                      if not args.no_broker else "--no-broker given")
        if isinstance(broker, str):
            res["skipped"][name] = broker
            say(f"{name} leg skipped: {broker}")
        else:
            targets[name] = broker
    cookies: dict[tuple[str, str], str | None] = {}
    for name, target in targets.items():
        for label, (file_name, _) in FILES.items():
            cookie = None if args.no_cookie or name == "direct" else cookie_for(target.port, "/" + file_name)
            if name != "direct" and not args.no_cookie and cookie is None:
                say(f"note: {name} set no {COOKIE} cookie on /{file_name}")
            cookies[(name, label)] = cookie
            run_wrk(target, "/" + file_name, args, args.warmup, cookie)  # warm-up, not counted
    for round_no in range(args.rounds):
        k = round_no % len(TARGETS)
        order = [t for t in TARGETS[k:] + TARGETS[:k] if t in targets]
        for label, (file_name, _) in FILES.items():
            for name in order:
                result = run_wrk(targets[name], "/" + file_name, args, args.seconds, cookies[(name, label)])
                for key, value in result.items():
                    res.setdefault(label, {}).setdefault(key, {}).setdefault(name, []).append(value)
                say(f"round {round_no + 1}/{args.rounds} {label:>5} {name:>12}: {result['rps']:9.0f} req/s  "
                    f"p50 {result.get('p50', 0):8.0f} µs  p99 {result.get('p99', 0):8.0f} µs"
                    + (f"  cpu {result['cpu_us']:6.1f} µs/req" if "cpu_us" in result else "")
                    + (f"  ERRORS {result['errors']:.0f}" if result["errors"] else ""))
    return res


def table(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The Markdown table: medians over rounds; ratios are medians of the per-round ratios."""
    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    rows: list[str] = []
    for label in FILES:
        figures = res.get(label, {})
        for q in ("p50", "p99"):  # added latency: the proxy's minus the direct one of the same round
            direct = figures.get(q, {}).get("direct", [])
            for t in BROKERS + ("haproxy",):
                values = figures.get(q, {}).get(t, [])
                figures.setdefault(f"added_{q}", {})[t] = [x - d for x, d in zip(values, direct)]
        figures["mbps"] = {t: [b / 1e6 for b in v] for t, v in figures.get("bps", {}).items()}

        def row(text: str, figure: str, spec: str, goal: str | None = None, ratio: bool = True) -> None:
            values = figures.get(figure, {})
            cells = [fmt(med(values.get(t, [])), spec) if t not in res["skipped"] else "skipped"
                     for t in TARGETS]
            ratios: list[float | None] = []
            for broker in BROKERS:
                pairs = [b / h for b, h in zip(values.get(broker, []), values.get("haproxy", [])) if h]
                ratios.append(med(pairs) if ratio else None)
            target_text = ""
            verdicts = []
            if goal:
                op, bound = GOALS[goal]
                target_text = f"{'≥' if op == '>=' else '≤'} {bound:g}×"
                for value in ratios:
                    if value is not None:
                        verdicts.append("met" if (value >= bound if op == ">=" else value <= bound) else "**missed**")
                    else:
                        verdicts.append("–")
            rows.append(f"| {text} | {' | '.join(cells)} | {' | '.join(fmt(r, '.2f') for r in ratios)} | "
                        f"{target_text} | {' / '.join(verdicts)} |")

        row(f"{label}: keep-alive requests/s", "rps", ".0f", goal="rps" if label == "small" else None)
        row(f"{label}: latency p50, µs", "p50", ".0f")
        row(f"{label}: latency p99, µs", "p99", ".0f")
        row(f"{label}: **added p50, µs** (p50 − direct p50)", "added_p50", ".0f",
            goal="added_p50" if label == "small" else None)
        row(f"{label}: added p99, µs", "added_p99", ".0f")
        row(f"{label}: MB/s", "mbps", ".1f", goal="mbps" if label == "1MB" else None)
        row(f"{label}: proxy CPU per request, µs", "cpu_us", ".1f")
        errors = {t: sum(v) for t, v in figures.get("errors", {}).items() if sum(v)}
        if errors:
            rows.append(f"| {label}: **errors** (non-2xx, socket) | "
                        + " | ".join(f"{errors.get(t, 0):.0f}" for t in TARGETS) + " | | | | |")
    head = ("| figure | " + " | ".join(HEADINGS[t] for t in TARGETS) + " | broker / HAProxy | "
            "broker ACCESS_LOG=0 / HAProxy | target | verdict (ACCESS_LOG=1 / =0) |\n"
            "|---|" + "---:|" * len(TARGETS) + "---:|---:|---|---|")
    notes = [
        f"Medians of {args.rounds} interleaved rounds of `wrk -t1 -c{args.connections} -d{args.seconds:g}s` "
        f"per file and target, on 127.0.0.1; {os.cpu_count()} CPUs shared by wrk, proxy and nginx. "
        "broker / HAProxy = median of the per-round ratios.",
        f"Backend: nginx {NGINX_VERSION}, `worker_processes 1`, `sendfile on`, access log off; files "
        f"{FILES['small'][1]} B and 1 MiB.",
        f"HAProxy {HAPROXY_VERSION}: `mode http`, `nbthread 1`, `cookie {COOKIE} insert`, "
        f"`server … cookie s1 maxconn {args.maxconn}`, no logging; broker: `[BALANCE_HTTP]`, "
        f"SORT_METHOD = ROUND_ROBIN, MONITORING_TYPE = DISABLED, one process (HAProxy: one thread), "
        f"Python {platform.python_version()}, Twisted {TWISTED_VERSION}.",
        "broker: ACCESS_LOG = 1, the default (one access-log line per request written to its log file); "
        "broker, ACCESS_LOG=0: no access log, as HAProxy here (it logs nothing without a `log` line).",
        ("wrk sends no cookie: every request is a first one (balanced, Set-Cookie)." if args.no_cookie
         else f"wrk sends back the {COOKIE} cookie each proxy set on a first request (affinity path)."),
        "Added latency = p50 (p99) minus the direct p50 (p99) of the same round. Proxy CPU = user + "
        "system time of the proxy process during the run / requests completed.",
    ]
    for name, reason in res["skipped"].items():
        notes.append(f"{name} leg skipped: {reason.splitlines()[0]}")
    return head + "\n" + "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> int:
    global HAPROXY, HAPROXY_VERSION, NGINX, NGINX_VERSION, WRK, TWISTED_VERSION
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; medians reported")
    parser.add_argument("--seconds", type=float, default=3, help="wrk -d per run")
    parser.add_argument("--warmup", type=float, default=1, help="wrk -d of the warm-up run per target")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (keep-alive connections)")
    parser.add_argument("--maxconn", type=int, default=1000, help="HAProxy per-server maxconn")
    parser.add_argument("--no-cookie", action="store_true", help="wrk sends no affinity cookie")
    parser.add_argument("--no-broker", action="store_true", help="direct and HAProxy only")
    parser.add_argument("--no-nolog", action="store_true", help="no second broker with ACCESS_LOG = 0")
    parser.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    parser.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    args = parser.parse_args()

    HAPROXY, NGINX, WRK = args.haproxy, args.nginx, args.wrk
    for name, path, package in (("haproxy", HAPROXY, "haproxy"), ("nginx", NGINX, "nginx-light"),
                                ("wrk", WRK, "wrk")):
        if not os.access(path, os.X_OK):
            sys.exit(f"bench-http: {name} not found ({path}); apt-get install {package}")
    HAPROXY_VERSION = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True).stdout.split()[2]
    nginx_v = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    NGINX_VERSION = nginx_v.strip().rsplit("/", 1)[-1] or "?"
    import twisted
    TWISTED_VERSION = twisted.__version__
    base._raise_nofile()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    base.TWISTED_VERSION = TWISTED_VERSION
    return base.run_and_report("bench-http", f"HAProxy {HAPROXY_VERSION}, nginx {NGINX_VERSION}, wrk",
                               lambda children: run(args, children), lambda res: table(res, args),
                               "http-latest.md")


HAPROXY = "haproxy"
HAPROXY_VERSION = "?"
NGINX = "nginx"
NGINX_VERSION = "?"
WRK = "wrk"
TWISTED_VERSION = "?"

if __name__ == "__main__":
    sys.exit(main())
