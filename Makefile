# protheus-broker — developer entry points.  `make run` (demo) and `make test` are the quick start.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: run run-nodes test test-floor lint bench bench-http bench-license bench-monitor bench-tls bench-resume bench-nodes bench-wake certs deb venv sim-warmup clean

# The project itself goes into the venv too, so `.venv/bin/twistd -n protheus-broker` and
# `.venv/bin/protheus-broker-ctl` work as the README shows: an editable install (the console
# script) plus a .pth naming this folder (twistd finds plugins in twisted/plugins on sys.path;
# setuptools' editable finder does not expose that folder).
$(VENV)/.done: setup.cfg Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q twisted pyopenssl service-identity configobj zope.interface \
		hypothesis cryptography psutil prometheus-client h11 treq pyyaml selenium mypy mypy-zope import-linter
	$(VENV)/bin/pip install -q --no-deps -e .
	$(PY) -c 'import sysconfig; open(sysconfig.get_paths()["purelib"] + "/protheus-broker-src.pth", "w").write("$(CURDIR)\n")'
	touch $@

venv: $(VENV)/.done

run: venv  ## the demo: broker on etc/demo.ini plus three sample AppServers (Ctrl-C stops all)
	$(PY) -m protheus_broker.demo

run-nodes: venv  ## the demo with managed nodes: etc/demo-nodes.ini, the broker starts and recycles its sample AppServers
	$(PY) -m protheus_broker.demo --nodes

test: venv  ## all tests, newest Twisted from PyPI
	$(PY) -m twisted.trial --temp-directory=/tmp/_trial_temp_protheus tests

test-floor:  ## all tests under Debian 12's own python3-twisted 22.4
	/usr/bin/python3 -m twisted.trial --temp-directory=/tmp/_trial_temp_protheus_floor tests

lint: venv  ## mypy (typed everywhere) and the import-linter layering contracts in setup.cfg
	$(VENV)/bin/mypy protheus_broker
	$(VENV)/bin/lint-imports

bench: venv  ## broker vs direct vs HAProxy on 127.0.0.1 (needs haproxy)
	$(PY) bench/bench.py

bench-http: venv  ## HTTP keep-alive: broker [BALANCE_HTTP] vs HAProxy mode http vs direct, against nginx (needs wrk, nginx, haproxy)
	$(PY) bench/bench_http.py

bench-license: venv  ## the license gate: requests/s and p50/p99 through a web-services unit, Stateless=1 path vs Stateless=0, against nginx (needs wrk, nginx)
	$(PY) bench/bench_license.py

bench-monitor: venv  ## broker CPU for 1,000 monitored servers at 1 report/s (plain and TLS)
	$(PY) bench/monitor_bench.py && $(PY) bench/monitor_bench.py --tls

bench-nodes: venv  ## managed nodes: spawn-to-ready time, sessions/s through Unix-socket vs TCP nodes
	$(PY) bench/bench_nodes.py

bench-wake: venv  ## scale to zero: a cold login's first byte vs the node's spawn-to-ready, warm logins, a held burst
	$(PY) bench/bench_wake.py

bench-resume: venv  ## resumable sessions: resume latency, RSS per standby session, connector throughput
	$(PY) bench/bench_resume.py

bench-tls: venv  ## TLS termination: broker vs HAProxy (bind ssl crt), throughput and handshakes/s
	$(PY) bench/bench_tls.py

sim-warmup: venv  ## warm-up from usage history: 4 synthetic weeks of office-hour logins on an accelerated clock (no network)
	$(PY) bench/sim_warmup.py

certs: venv  ## demo/test certificates (agent channel, SmartClient TLS) in etc/tls (not for git)
	$(PY) -m protheus_broker.tls.certs etc/tls --agent local=127.0.0.1,localhost \
		--server broker-tls=127.0.0.1,localhost --server appserver=127.0.0.1,localhost

deb:  ## the Debian package in dist/ (build deps: apt-get build-dep ./); builds the last commit
	bash packaging/ci-deb.sh --build-only dist

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info twisted/plugins/dropin.cache
