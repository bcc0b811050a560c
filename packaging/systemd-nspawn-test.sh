#!/usr/bin/env bash
# Exercise the .deb under a real systemd (PID 1 in a systemd-nspawn container) on a machine where
# systemd is not PID 1: the hardened unit really runs, reload, restart on upgrade, stop on remove,
# start-after-install rules, purge.  Optional (not part of ci-deb.sh); root only.
#
#   packaging/systemd-nspawn-test.sh DEB [NEWER_DEB]
#
# The container boots this machine's own root through an overlay whose upper layer is a tmpfs:
# nothing it writes reaches the host.  Needs systemd-container (installed if missing), overlayfs.
set -euo pipefail
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }
[ $# -ge 1 ] || { sed -n '6p' "$0"; exit 2; }
deb=$(readlink -f "$1"); newer=${2:+$(readlink -f "$2")}

command -v systemd-nspawn >/dev/null || apt-get install -y -qq --no-install-recommends systemd-container >/dev/null
t0=$(date +%s)
work=$(mktemp -d /tmp/nspawn-test.XXXXXX)
mounted=()
made_dir=""
cleanup() {
  local rc=$? i
  for (( i=${#mounted[@]}-1; i>=0; i-- )); do umount "${mounted[$i]}" || true; done
  [ -z "$made_dir" ] || rmdir "$made_dir" || true
  rm -rf "$work"
  echo "systemd-nspawn-test: $([ "$rc" -eq 0 ] && echo PASSED || echo "FAILED (exit $rc)") in $(( $(date +%s) - t0 ))s"
  exit "$rc"
}
trap cleanup EXIT

mkdir -p "$work/layers" "$work/root" "$work/share"
mount -t tmpfs -o size=2G tmpfs "$work/layers"; mounted+=("$work/layers")
mkdir -p "$work/layers/upper" "$work/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/layers/upper,workdir=$work/layers/work" "$work/root"
mounted+=("$work/root")
# nspawn keeps per-machine state under /run/systemd/nspawn and refuses to clean it off a disk fs.
if ! mountpoint -q /run/systemd/nspawn; then
  [ -d /run/systemd/nspawn ] || { mkdir -p /run/systemd/nspawn; made_dir=/run/systemd/nspawn; }
  mount -t tmpfs tmpfs /run/systemd/nspawn; mounted+=(/run/systemd/nspawn)
fi
cp "$deb" "$work/share/old.deb"; [ -z "$newer" ] || cp "$newer" "$work/share/new.deb"

root=$work/root
rm -f "$root/etc/machine-id" "$root/usr/sbin/policy-rc.d"   # own machine id; let services start
rm -f "$root"/etc/systemd/system/multi-user.target.wants/*.service   # only our test boots
cat >"$root/etc/systemd/system/pkgtest.service" <<'EOF'
[Unit]
Description=protheus-broker package test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /share/test.sh
ExecStopPost=/bin/systemctl poweroff --no-block
EOF
ln -s /etc/systemd/system/pkgtest.service "$root/etc/systemd/system/multi-user.target.wants/pkgtest.service"

cat >"$work/share/test.sh" <<'EOF'
exec >/share/out.log 2>&1
set -u
ok=0; bad=0
check() { local what=$1; shift; if "$@"; then echo "ok   $what"; ok=$((ok+1)); else echo "FAIL $what"; bad=$((bad+1)); fi; }
active() { [ "$(systemctl is-active protheus-broker)" = active ]; }
inactive() { ! active; }
greets() { python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1",4000),timeout=5); l=s.makefile("rb").readline(); s.sendall(b"ping"); sys.exit(not (l.startswith(b"PROTHEUS-SIM") and s.recv(4)==b"ping"))'; }
pid() { systemctl show -p MainPID --value protheus-broker; }

check "systemd is PID 1" [ "$(ps -p 1 -o comm=)" = systemd ]
dpkg -i /share/old.deb >/share/dpkg-1.log 2>&1
for unit in protheus-broker protheus-agent; do
  check "fresh install: $unit enabled" systemctl -q is-enabled $unit
  check "fresh install: $unit not started" bash -c "! systemctl -q is-active $unit"
done
check "postinst says why" grep -q 'enabled but not started' /share/dpkg-1.log
systemctl start protheus-appserver-sim@5000 protheus-appserver-sim@5001
systemctl start protheus-broker
check "systemctl start with the shipped placeholder: skipped by ExecCondition" inactive
check "the journal says why" bash -c 'journalctl -u protheus-broker | grep -q "is the shipped example"'
echo 'REMOTE_SERVER_02 = 127.0.0.1 5001' >>/etc/protheus-broker/appserver.ini
check "an edited config starts" systemctl start protheus-broker
sleep 2
check "session through the hardened unit" greets
check "state and log dirs owned by the user" [ "$(stat -c %U /var/lib/protheus-broker /var/log/protheus-broker | sort -u)" = protheus-broker ]
before=$(pid); systemctl reload protheus-broker; sleep 1
check "reload keeps the process" [ "$(pid)" = "$before" ]
check "reload logged" bash -c 'journalctl -u protheus-broker | grep -q reloaded'
for unit in protheus-broker protheus-agent; do
  check "online exposure of $unit <= 3.0" bash -c "systemd-analyze security $unit | awk '/Overall exposure/ {exit !(\$(NF-2) <= 3.0)}'"
done
head -c 24 /dev/urandom | base64 >/etc/protheus-broker/agent.secret
chgrp protheus-broker /etc/protheus-broker/agent.secret; chmod 0640 /etc/protheus-broker/agent.secret
sed -i 's|^;SECRET_FILE = |SECRET_FILE = |' /etc/protheus-broker/agent.ini
printf '[APPSERVER_02]\nPORT = 5001\n' >>/etc/protheus-broker/agent.ini
check "a configured agent starts" systemctl start protheus-agent
sleep 3
check "the agent stays up (it reads /proc of the sample AppServers)" systemctl -q is-active protheus-agent
journalctl -u protheus-agent | tail -n 5
if [ -e /share/new.deb ]; then
  before=$(pid); dpkg -i /share/new.deb >/share/dpkg-2.log 2>&1; sleep 2
  check "upgrade restarts a running broker" [ "$(pid)" != "$before" ] && check "still serving after upgrade" greets
  check "agent still running after upgrade" systemctl -q is-active protheus-agent
fi
dpkg -r protheus-broker >/share/dpkg-3.log 2>&1
check "remove stops the broker" inactive
check "remove stops the agent and the sample AppServers" bash -c '! systemctl -q is-active protheus-agent protheus-appserver-sim@5000 protheus-appserver-sim@5001'
check "remove keeps the config" [ -f /etc/protheus-broker/appserver.ini ]
systemctl start protheus-appserver-sim@5000 protheus-appserver-sim@5001 2>/dev/null || true
dpkg -i /share/old.deb >/share/dpkg-4.log 2>&1; sleep 2
check "install after remove with an edited config starts it" active
echo 'LOCAL_SERVER_PORT = x' >>/etc/protheus-broker/appserver.ini
systemctl restart protheus-broker; sleep 20
check "a bad config: the start limit stops the restart loop" [ "$(systemctl is-active protheus-broker)" = failed ]
check "a bad config: the journal names file, line and key" bash -c 'journalctl -u protheus-broker | grep -q "appserver.ini:[0-9]*: LOCAL_SERVER_PORT"'
dpkg --purge protheus-broker >/share/dpkg-5.log 2>&1
check "purge removes state and logs" bash -c '! ls -d /var/lib/protheus-broker /var/log/protheus-broker 2>/dev/null'
check "purge removes the configs, keeps (and names) the admin's agent.secret" \
  bash -c '[ "$(ls /etc/protheus-broker)" = agent.secret ] && grep -q "/etc/protheus-broker kept" /share/dpkg-5.log'
check "purge removes the statoverrides" bash -c '! dpkg-statoverride --list | grep -q protheus'
echo "$ok ok, $bad failed"
[ "$bad" -eq 0 ] && touch /share/passed
EOF

timeout 300 systemd-nspawn --quiet --register=no --keep-unit --link-journal=no -M protheus-pkgtest \
  -D "$root" --bind="$work/share:/share" --boot >"$work/console.log" 2>&1 </dev/null || true
cat "$work/share/out.log" 2>/dev/null || { tail -n 30 "$work/console.log"; exit 1; }
[ -e "$work/share/passed" ]
