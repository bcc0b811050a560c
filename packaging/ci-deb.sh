#!/usr/bin/env bash
# Build, lint, install, smoke-test and purge the protheus-broker Debian package.
#
#   packaging/ci-deb.sh [OUTDIR]               full run, as root on Debian 12 (CI: .ci/run)
#   packaging/ci-deb.sh --build-only [OUTDIR]  only build the .deb into OUTDIR (make deb)
#   packaging/ci-deb.sh --with-systemd [OUTDIR] full run, then the same .deb under a real systemd
#                                               (packaging/systemd-nspawn-test.sh, about 60 s)
#
# OUTDIR defaults to ./dist.  The .deb is built from a clean copy of the committed tree
# (git archive of HEAD as it is at start) with a PATH free of pyenv/venv pythons.  DEB_BUILD_OPTIONS is passed
# through (DEB_BUILD_OPTIONS=nocheck skips the trial suite).  Safe to run again on the same
# machine: a protheus-broker left installed by an earlier run is purged first.
set -euo pipefail
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
CLEAN_PATH=/usr/sbin:/usr/bin:/sbin:/bin
PKG=protheus-broker
MAX_EXPOSURE=3.0

build_only=0
with_systemd=0
outdir=dist
for arg in "$@"; do
  case "$arg" in
    --build-only) build_only=1 ;;
    --with-systemd) with_systemd=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "ci-deb.sh: unknown option $arg" >&2; exit 2 ;;
    *) outdir=$arg ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
logs=$outdir/logs
mkdir -p "$logs"
work=$(mktemp -d /tmp/ci-deb.XXXXXX)
chmod 0755 "$work"   # the service user reads the smoke-test config under it

# --- bookkeeping: timings, failures, the processes we start ---------------------------------
t0=$(date +%s.%N)
step_name=""
step_start=$t0
timings=()
pids=()

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
end_step() {
  if [ -n "$step_name" ]; then
    local took; took=$(elapsed "$step_start" "$(now)")
    timings+=("$(printf '%-50s %6ss' "$step_name" "$took")")
    echo "--- $step_name: ${took}s"
  fi
  step_name=""
}
step() { end_step; step_name=$*; step_start=$(now); echo; echo "=== $*"; }
fail() { echo "ci-deb.sh: FAILED${step_name:+ in '$step_name'}: $*" >&2; exit 1; }
summary() {
  end_step
  echo
  echo "=== ci-deb.sh timings"
  local line; for line in "${timings[@]}"; do echo "$line"; done
  printf '%-50s %6ss\n' "total" "$(elapsed "$t0" "$(now)")"
}

stop_pid() {  # stop one process we started: TERM, wait up to 10 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "pid $pid ignored SIGTERM for 10 s: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  rm -rf "$work"
  [ "$rc" -eq 0 ] || echo "ci-deb.sh: exit $rc (logs in $logs)" >&2
  summary
  exit "$rc"
}
trap cleanup EXIT

as_root() { [ "$(id -u)" -eq 0 ]; }

# --- build ----------------------------------------------------------------------------------
git_=(git -c safe.directory="$repo" -C "$repo")   # the checkout may belong to another user
rev=""   # every copy is of this one commit, even if HEAD moves while we run
if command -v git >/dev/null && rev=$("${git_[@]}" rev-parse --verify -q HEAD); then
  echo "building commit $("${git_[@]}" rev-parse --short "$rev") ($("${git_[@]}" log -1 --format=%s "$rev" | cut -c1-60))"
  if [ -n "$("${git_[@]}" status --porcelain --untracked-files=no)" ]; then
    echo "note: uncommitted changes are not built"
  fi
fi

clean_tree() {  # a clean copy of the committed tree in $1
  mkdir -p "$1"
  if [ -n "$rev" ]; then
    "${git_[@]}" archive --format=tar "$rev" | tar -x -C "$1"
  else  # not a git checkout (a release tarball): copy it without build and test leftovers
    tar -C "$repo" --exclude=.git --exclude=.venv --exclude=./dist --exclude=.pybuild --exclude=./build \
      --exclude='_trial_temp*' --exclude=.hypothesis --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=dropin.cache -cf - . | tar -x -C "$1"
  fi
}

build() {  # build in a fresh copy $work/$1; leaves the .deb path in $deb_built
  local dir=$work/$1
  clean_tree "$dir/src"
  if ! (cd "$dir/src" && env PATH="$CLEAN_PATH" dpkg-buildpackage -us -uc -b) >"$logs/$1.log" 2>&1; then
    tail -n 60 "$logs/$1.log"
    fail "dpkg-buildpackage (full log: $logs/$1.log; if tests of code in progress fail, DEB_BUILD_OPTIONS=nocheck skips them)"
  fi
  grep -E '^(Ran [0-9]+ tests|PASSED|FAILED)' "$logs/$1.log" | sed 's/^/  trial: /' || true
  deb_built=$(ls "$dir"/${PKG}_*_all.deb)
  echo "  built $(basename "$deb_built") ($(stat -c %s "$deb_built") bytes)"
}

if [ "$build_only" -eq 1 ]; then step "build deps (dpkg-checkbuilddeps)"
else step "build deps (apt-get build-dep ./ + lintian systemd)"; fi
clean_tree "$work/deps"
if ! (cd "$work/deps" && dpkg-checkbuilddeps) 2>/dev/null || [ "$build_only" -eq 0 ]; then
  as_root || fail "build dependencies missing and not root: $(cd "$work/deps" && dpkg-checkbuilddeps 2>&1 || true)"
  if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then apt-get update -qq; fi
  extra=()
  [ "$build_only" -eq 1 ] || extra=(lintian systemd)
  if ! (cd "$work/deps" && apt-get build-dep -y -qq --no-install-recommends ./ >"$logs/apt-build-dep.log" 2>&1); then
    echo "  apt-get build-dep failed: apt-get update and retry"   # stale package lists
    apt-get update -qq
    (cd "$work/deps" && apt-get build-dep -y -qq --no-install-recommends ./ >"$logs/apt-build-dep.log" 2>&1) \
      || { tail -n 30 "$logs/apt-build-dep.log"; fail "apt-get build-dep"; }
  fi
  if [ "${#extra[@]}" -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${extra[@]}" >"$logs/apt-tools.log" 2>&1 \
      || { tail -n 30 "$logs/apt-tools.log"; fail "apt-get install ${extra[*]}"; }
  fi
  echo "  installed: build-dep ./ ${extra[*]}"
fi

step "build #1 (dpkg-buildpackage, trial suite)"
echo "  DEB_BUILD_OPTIONS='${DEB_BUILD_OPTIONS:-}'"
build build-1
rm -f "$outdir"/${PKG}_*.deb
cp "$deb_built" "$outdir/"
deb=$outdir/$(basename "$deb_built")
sha1=$(sha256sum "$deb" | cut -d' ' -f1)
echo "  $deb"
echo "  sha256 $sha1"

if [ "$build_only" -eq 1 ]; then
  exit 0
fi
as_root || fail "the full run installs the package: run it as root (or use --build-only)"

step "check the .deb's contents"
# (grep reads here-strings, never a pipe: with pipefail an early grep -q exit fails the writer)
contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
grep -q 'dropin\.cache' <<<"$contents" && fail "dropin.cache in the .deb"
grep -qE 'dist-packages/(.*/)?(\.hypothesis|_trial_temp|tests|etc)/' <<<"$contents" && fail "test leftovers in the .deb"
ours=$(grep '^\./usr/lib/python3/dist-packages/twisted/' <<<"$contents" | grep -v '/$' || true)
[ "$ours" = "./usr/lib/python3/dist-packages/twisted/plugins/protheus_broker_plugin.py" ] \
  || fail "under twisted/ only the plugin file may be shipped, found: $ours"
triggers=$(dpkg-deb -I "$deb" triggers)
grep -qx 'activate-noawait twisted-plugins-cache' <<<"$triggers" || fail "no plugin-cache trigger"
echo "  ok: only twisted/plugins/protheus_broker_plugin.py under twisted/, no dropin.cache, trigger present"

step "lintian -I -E --pedantic"
lintian_out=$(lintian -I -E --pedantic "$deb" 2>&1 | grep -v '^running with root privileges' || true)
echo "${lintian_out:-  (no tags)}"
if grep -qE '^[EW]: ' <<<"$lintian_out"; then fail "lintian errors or warnings"; fi
echo "  lintian: no errors, no warnings"

step "build #2 elsewhere, compare sha256"
build build-2
sha2=$(sha256sum "$deb_built" | cut -d' ' -f1)
if [ "$sha1" != "$sha2" ]; then
  echo "  build-1 $sha1"; echo "  build-2 $sha2"
  diff <(dpkg-deb -c "$deb" | sort) <(dpkg-deb -c "$deb_built" | sort) || true
  fail "the two builds differ"
fi
echo "  reproducible: both builds sha256 $sha1"

step "install: apt-get install ./$(basename "$deb")"
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -qv 'not-installed'; then
  echo "  $PKG left by an earlier run: purging it first"
  apt-get purge -y -qq "$PKG" >"$logs/apt-prepurge.log" 2>&1 || fail "purging the earlier $PKG"
fi
apt-get install -y "$deb" >"$logs/apt-install.log" 2>&1 || { cat "$logs/apt-install.log"; fail "apt-get install"; }
grep -A20 '^Setting up protheus-broker' "$logs/apt-install.log" | sed 's/^/  | /'
dpkg-query -W -f='${Status}\n' "$PKG" | grep -q 'install ok installed' || fail "$PKG is not installed"
for daemon in protheus-broker protheus-agent protheus-license; do
  grep -q "^$daemon: enabled but not started" "$logs/apt-install.log" \
    || fail "postinst did not say it left $daemon's shipped placeholder config unstarted"
  [ -L "/etc/systemd/system/multi-user.target.wants/$daemon.service" ] || fail "$daemon.service not enabled"
done
unit=$(dpkg -L "$PKG" | grep '/systemd/system/protheus-broker\.service$')
agent_unit=$(dpkg -L "$PKG" | grep '/systemd/system/protheus-agent\.service$')
license_unit=$(dpkg -L "$PKG" | grep '/systemd/system/protheus-license\.service$')
sim_unit=$(dpkg -L "$PKG" | grep '/systemd/system/protheus-appserver-sim@\.service$')
[ -e /etc/systemd/system/multi-user.target.wants/protheus-appserver-sim@.service ] && fail "the sim template got enabled"
getent passwd protheus-broker >/dev/null || fail "no protheus-broker user"
for spec in /etc/protheus-broker:750 /etc/protheus-broker/appserver.ini:640 /etc/protheus-broker/agent.ini:640 /etc/protheus-broker/license.ini:640 \
    /var/lib/protheus-broker:750; do
  path=${spec%:*}; [ -e "$path" ] || fail "$path missing"
  got=$(stat -c '%a %G' "$path"); [ "$got" = "${spec##*:} protheus-broker" ] || fail "$path is '$got', not '${spec##*:} protheus-broker'"
done
help=$(twistd3 --help)
for plugin in protheus-broker protheus-agent protheus-license protheus-appserver-sim; do
  grep -q "$plugin" <<<"$help" || fail "twistd3 --help does not list $plugin"
done
echo "  installed; broker, agent and license units enabled, not started; sim template not enabled"
echo "  /etc/protheus-broker 750, its configs 640, group protheus-broker; twistd3 lists the 4 plugins"

step "systemd-analyze verify, security"
man_opt=()
if ! command -v man >/dev/null || [ ! -e /usr/share/man/man8/protheus-broker.8.gz ]; then
  man_opt=(--man=no); echo "  (man pages not installed on this machine: --man=no)"
fi
for u in "$unit" "$agent_unit" "$license_unit" "$sim_unit"; do
  systemd-analyze verify "${man_opt[@]}" "$u" || fail "systemd-analyze verify $u"
  echo "  verify ok: $u"
done
cp "$sim_unit" "$work/protheus-appserver-sim@5000.service"   # score an instance of the template
for u in "$unit" "$agent_unit" "$license_unit" "$work/protheus-appserver-sim@5000.service"; do
  score=$(systemd-analyze security --offline=yes "$u" | sed -n 's/.*Overall exposure level for \([^:]*\): \([0-9.]*\).*/\1 \2/p')
  [ -n "$score" ] || fail "no exposure score for $u"
  echo "  exposure: $score (limit $MAX_EXPOSURE)"
  awk -v s="${score##* }" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }' || fail "exposure of $u above $MAX_EXPOSURE"
done

step "ExecCondition: the shipped placeholders are skipped"
for spec in "$unit:/etc/protheus-broker/appserver.ini" "$agent_unit:/etc/protheus-broker/agent.ini" \
    "$license_unit:/etc/protheus-broker/license.ini"; do
  u=${spec%%:*}; conf=${spec#*:}
  condition=$(sed -n 's/^ExecCondition=//p' "$u"); [ -n "$condition" ] || fail "no ExecCondition in $u"
  eval "set -- $condition"   # our own unit file: split it as systemd does (no specifiers used)
  if runuser -u protheus-broker -- "$@" >/dev/null; then fail "$(basename "$u"): ExecCondition lets the placeholder run"; fi
  cp -p "$conf" "$work/conf.bak"; echo "; edited" >>"$conf"
  runuser -u protheus-broker -- "$@" >/dev/null || { cp -p "$work/conf.bak" "$conf"; fail "$(basename "$u"): ExecCondition refuses an edited config"; }
  cp -p "$work/conf.bak" "$conf"
  echo "  $(basename "$u"): skipped with the shipped $conf, runs once it is edited"
done

step "smoke test: 2 sample AppServers, broker, agent"
user=$(sed -n 's/^User=//p' "$unit"); [ -n "$user" ] || fail "no User= in $unit"
workdir=$(sed -n 's/^WorkingDirectory=//p' "$unit"); workdir=${workdir:-/}
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
case "$exec_start" in *\"*|*\'*|*%*|*\$*) fail "ExecStart needs systemd quoting/specifiers: $exec_start" ;; esac
[[ "$exec_start" =~ --config\ [^\ ]+ ]] || fail "no --config PATH in ExecStart: $exec_start"
config_arg=${BASH_REMATCH[0]}
smoke_ini=$work/smoke.ini

start_as_user() {  # start_as_user NAME CMD...: run as $user in $workdir, log to $logs/NAME.log
  local name=$1; shift
  (cd "$workdir" && exec runuser -u "$user" -- "$@") >"$logs/$name.log" 2>&1 &
  local runuser_pid=$! i child=""
  pids+=("$runuser_pid")
  for i in $(seq 50); do child=$(pgrep -P "$runuser_pid" || true); [ -n "$child" ] && break; sleep 0.1; done
  [ -n "$child" ] && pids+=("$child")
  started_pid=${child:-$runuser_pid}
}
wait_listening() {  # wait_listening NAME: the port from "listening on 127.0.0.1:PORT" in its log
  local name=$1 i port
  for i in $(seq 200); do
    port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$logs/$name.log" | head -n1)
    [ -n "$port" ] && { echo "$port"; return 0; }
    kill -0 "$started_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$logs/$name.log" >&2
  fail "$name did not report 'listening on 127.0.0.1:PORT'"
}

sim_cmd=(/usr/bin/twistd3 --nodaemon --pidfile= protheus-appserver-sim --port tcp:0:interface=127.0.0.1)
start_as_user sim-A "${sim_cmd[@]}" --name A; sim_a_pid=$started_pid; port_a=$(wait_listening sim-A)
start_as_user sim-B "${sim_cmd[@]}" --name B; sim_b_pid=$started_pid; port_b=$(wait_listening sim-B)
echo "  sample AppServers: A on 127.0.0.1:$port_a (pid $sim_a_pid), B on 127.0.0.1:$port_b (pid $sim_b_pid)"

cat >"$smoke_ini" <<EOF
; ci-deb.sh smoke test
[BALANCE_SMART_CLIENT_DESKTOP]
LOCAL_SERVER_PORT = 0
LOCAL_SERVER_INTERFACE = 127.0.0.1
REMOTE_SERVER_A = 127.0.0.1 $port_a
REMOTE_SERVER_B = 127.0.0.1 $port_b
SORT_METHOD = CONNECTION
MONITORING_TYPE = DISABLED
CONNECT_TIMEOUT = 5
EOF
chmod 0644 "$smoke_ini"
broker_cmd=${exec_start/"$config_arg"/--config $smoke_ini}
echo "  ExecStart: $exec_start"
echo "  running:   runuser -u $user -- $broker_cmd   (cwd $workdir)"
read -r -a broker_argv <<<"$broker_cmd"
start_as_user broker "${broker_argv[@]}"; broker_pid=$started_pid; port_broker=$(wait_listening broker)
echo "  broker on 127.0.0.1:$port_broker (pid $broker_pid)"

client() {  # client PORT: two sessions at once, greetings A and B session 1, echo; then SIGHUP
  /usr/bin/python3 - "$1" "$broker_pid" <<'EOF'
import os, re, signal, socket, sys, time

port, broker_pid = int(sys.argv[1]), int(sys.argv[2])

def session():
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    line = sock.makefile("rb").readline()
    match = re.fullmatch(rb"PROTHEUS-SIM (A|B) session 1\r\n", line)
    if not match:
        sys.exit(f"unexpected greeting {line!r}")
    return sock, match.group(1).decode(), line.decode().strip()

def echo(sock, size):
    data = os.urandom(size)
    sock.sendall(data)
    got = b""
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            sys.exit(f"connection closed after {len(got)} of {size} echoed bytes")
        got += chunk
    if got != data:
        sys.exit("echo differs from what was sent")

first, name1, greeting1 = session()
second, name2, greeting2 = session()
print(f"  greetings: {greeting1!r}, {greeting2!r}")
if {name1, name2} != {"A", "B"}:
    sys.exit("SORT_METHOD=CONNECTION should put the two open sessions on A and B")
echo(first, 1 << 20)
echo(second, 1 << 20)
print("  echo ok: 1 MiB each way on both sessions")
os.kill(broker_pid, signal.SIGHUP)  # what ExecReload sends
time.sleep(1)
echo(first, 4096)
print("  SIGHUP: the open session still echoes")
first.close(); second.close()
EOF
}
client "$port_broker" || fail "session through the broker"
grep -q 'reloaded' "$logs/broker.log" || { cat "$logs/broker.log"; fail "the broker did not log a reload after SIGHUP"; }
echo "  broker log: $(grep -m1 -o 'reloaded .*' "$logs/broker.log")"

# The agent: the unit's own ExecStart as the service user, watching both sample AppServers.
agent_exec=$(sed -n 's/^ExecStart=//p' "$agent_unit")
[[ "$agent_exec" =~ --config\ [^\ ]+ ]] || fail "no --config PATH in $agent_unit's ExecStart"
agent_ini=$work/agent.ini
cat >"$agent_ini" <<AGENT_INI
; ci-deb.sh smoke test
[AGENT]
PORT = 0
INTERFACE = 127.0.0.1
SECRET = $(head -c 24 /dev/urandom | base64)
SAMPLE_INTERVAL = 0.2
[APPSERVER_A]
PORT = $port_a
[APPSERVER_B]
PORT = $port_b
AGENT_INI
chmod 0644 "$agent_ini"
agent_cmd=${agent_exec/"${BASH_REMATCH[0]}"/--config $agent_ini}
read -r -a agent_argv <<<"$agent_cmd"
start_as_user agent "${agent_argv[@]}"; agent_pid=$started_pid; port_agent=$(wait_listening agent)
sleep 1   # five samples
kill -0 "$agent_pid" 2>/dev/null || { cat "$logs/agent.log"; fail "the agent exited"; }
grep -q Traceback "$logs/agent.log" && { cat "$logs/agent.log"; fail "traceback in the agent's log"; }
echo "  agent on 127.0.0.1:$port_agent (pid $agent_pid): $(grep -o 'watching .*' "$logs/agent.log" | head -n1)"
stop_pid "$agent_pid"

for pid in "$broker_pid" "$sim_a_pid" "$sim_b_pid"; do stop_pid "$pid"; done
for pid in "${pids[@]}"; do stop_pid "$pid"; done
pids=()
echo "  stopped broker, agent and sample AppServers by pid"

step "upgrade to a rebuilt newer version"
# Same tree, one more changelog entry, tests skipped (they ran twice above).  Checks what an
# upgrade must keep: the plugins in twistd3 (trigger), the conffile, the enabled unit.
clean_tree "$work/upgrade/src"
new_version="$(dpkg-parsechangelog -l "$work/upgrade/src/debian/changelog" -S Version)+ciupgrade1"
{ printf '%s (%s) unstable; urgency=medium\n\n  * ci-deb.sh upgrade test build.\n\n' "$PKG" "$new_version"
  printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l "$work/upgrade/src/debian/changelog" -S Maintainer)" \
    "$(date -R -d "@$(dpkg-parsechangelog -l "$work/upgrade/src/debian/changelog" -S Timestamp)")"
  cat "$work/upgrade/src/debian/changelog"; } >"$work/upgrade/changelog"
mv "$work/upgrade/changelog" "$work/upgrade/src/debian/changelog"
(cd "$work/upgrade/src" && env PATH="$CLEAN_PATH" DEB_BUILD_OPTIONS=nocheck dpkg-buildpackage -us -uc -b) \
  >"$logs/build-upgrade.log" 2>&1 || { tail -n 40 "$logs/build-upgrade.log"; fail "building $new_version"; }
ini_sum=$(md5sum </etc/protheus-broker/appserver.ini)
apt-get install -y "$(ls "$work"/upgrade/${PKG}_*_all.deb)" >"$logs/apt-upgrade.log" 2>&1 \
  || { cat "$logs/apt-upgrade.log"; fail "apt-get install $new_version"; }
[ "$(dpkg-query -W -f='${Version}' "$PKG")" = "$new_version" ] || fail "not upgraded to $new_version"
help=$(twistd3 --help)
grep -q 'protheus-agent' <<<"$help" || fail "after the upgrade twistd3 --help does not list protheus-agent"
[ "$(md5sum </etc/protheus-broker/appserver.ini)" = "$ini_sum" ] || fail "the upgrade changed appserver.ini"
[ -L /etc/systemd/system/multi-user.target.wants/protheus-broker.service ] || fail "unit no longer enabled"
[ "$(stat -c '%a %G' /etc/protheus-broker/appserver.ini)" = "640 protheus-broker" ] || fail "the upgrade reset appserver.ini's mode"
grep -q 'enabled but not started' "$logs/apt-upgrade.log" && fail "postinst ran its first-install start logic on upgrade"
echo "  upgraded $(basename "$deb") -> $new_version: plugins listed, conffile and its mode kept, unit enabled"

step "remove (keeps config), purge (removes all)"
apt-get remove -y -qq "$PKG" >"$logs/apt-remove.log" 2>&1 || { cat "$logs/apt-remove.log"; fail "apt-get remove"; }
[ -f /etc/protheus-broker/appserver.ini ] || fail "apt remove deleted /etc/protheus-broker/appserver.ini"
echo "  after remove: /etc/protheus-broker/appserver.ini kept"
apt-get purge -y -qq "$PKG" >"$logs/apt-purge.log" 2>&1 || { cat "$logs/apt-purge.log"; fail "apt-get purge"; }
left=()
for path in /etc/protheus-broker /var/lib/protheus-broker /var/log/protheus-broker \
    /usr/lib/python3/dist-packages/protheus_broker \
    /usr/lib/python3/dist-packages/twisted/plugins/protheus_broker_plugin.py \
    /usr/lib/python3/dist-packages/twisted/plugins/__pycache__/protheus_broker_plugin.cpython-311.pyc \
    /usr/share/protheus-broker "$unit" "$agent_unit" "$license_unit" "$sim_unit" \
    /etc/systemd/system/multi-user.target.wants/protheus-broker.service \
    /etc/systemd/system/multi-user.target.wants/protheus-agent.service \
    /etc/systemd/system/multi-user.target.wants/protheus-license.service; do
  { [ -e "$path" ] || [ -L "$path" ]; } && left+=("$path")
done
[ "${#left[@]}" -eq 0 ] || fail "left after purge: ${left[*]}"
dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q 'config-files' && fail "$PKG still in config-files state"
help=$(twistd3 --help)
if grep -q protheus <<<"$help"; then fail "twistd3 --help still lists protheus plugins"; fi
if grep -qs protheus /usr/lib/python3/dist-packages/twisted/plugins/dropin.cache; then
  fail "Twisted's plugin cache still names protheus_broker_plugin"
fi
statoverrides=$(dpkg-statoverride --list | grep protheus-broker || true)
[ -z "$statoverrides" ] || fail "statoverrides left after purge: $statoverrides"
echo "  after purge: no config, state, logs, plugin, units, statoverrides; twistd3 lists no protheus plugin"
echo "  (the system user protheus-broker is kept, as Debian does; see README.Debian)"

if [ "$with_systemd" -eq 1 ]; then
  step "under a real systemd (systemd-nspawn-test.sh)"
  bash "$repo/packaging/systemd-nspawn-test.sh" "$deb" "$(ls "$work"/upgrade/${PKG}_*_all.deb)" \
    || fail "packaging/systemd-nspawn-test.sh"
fi

end_step
echo
echo "ci-deb.sh: PASSED ($(basename "$deb"), sha256 $sha1, reproducible)"
