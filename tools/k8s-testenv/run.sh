#!/bin/bash
# start | stop | env — a real Kubernetes control plane on 127.0.0.1 for tests: etcd, kube-apiserver (:6443,
# bearer token auth, RBAC) and kube-controller-manager (deployment + replicaset controllers, so a Deployment's
# scale creates and deletes Pods; endpoint + endpointslice controllers, so a Service tracks ready Pods). There
# is no kubelet or scheduler: Pods stay Pending until a test does their work: create a Node object once,
# bind each Pod to it (POST pods/NAME/binding, as the scheduler would), then patch pods/NAME/status with
# phase Running, a podIP and the Ready condition (as a kubelet would); the endpointslice controller then
# lists the Pod as a ready endpoint (discovery.k8s.io/v1beta1 in this Kubernetes 1.20). Build first with
# build.sh.
# K8S_TESTENV_RUN (state, logs, pid files), K8S_TESTENV_PORT (API), K8S_TESTENV_ETCD_PORT and
# K8S_TESTENV_ETCD_PEER_PORT let a test run its own copy beside another.  (A copy of
# ../shared/tools/k8s-testenv/run.sh with those etcd port variables added.)
# `start` prints the kubeconfig path; `env` prints KUBECONFIG=… and K8S_TOKEN=… lines to eval.
set -euo pipefail
W=${K8S_TESTENV:-$HOME/.cache/k8s-testenv}
R=${K8S_TESTENV_RUN:-$W/run}
PORT=${K8S_TESTENV_PORT:-6443}
EP=${K8S_TESTENV_ETCD_PORT:-2379}      # etcd client port (tests pick free ones)
EPP=${K8S_TESTENV_ETCD_PEER_PORT:-2380}
TOKEN=testenv-token
case ${1:-} in
start)
  [[ -x $W/bin/kube-apiserver ]] || { echo "k8s-testenv: not built; run build.sh" >&2; exit 2; }
  "$0" stop >/dev/null 2>&1 || true
  rm -rf "$R"; mkdir -p "$R"/pki "$R"/etcd
  openssl genrsa -out "$R"/pki/sa.key 2048 2>/dev/null
  openssl rsa -in "$R"/pki/sa.key -pubout -out "$R"/pki/sa.pub 2>/dev/null
  echo "$TOKEN,admin,1,\"system:masters\"" > "$R"/pki/tokens.csv
  cat > "$R"/kubeconfig <<KC
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster: {server: "https://127.0.0.1:$PORT", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: $TOKEN}
contexts:
- name: testenv
  context: {cluster: testenv, user: admin, namespace: default}
current-context: testenv
KC
  "$W"/root/usr/bin/etcd --data-dir "$R"/etcd --name testenv \
     --listen-client-urls http://127.0.0.1:$EP --advertise-client-urls http://127.0.0.1:$EP \
     --listen-peer-urls http://127.0.0.1:$EPP --initial-advertise-peer-urls http://127.0.0.1:$EPP \
     --initial-cluster testenv=http://127.0.0.1:$EPP >"$R"/etcd.log 2>&1 &
  echo $! > "$R"/etcd.pid
  "$W"/bin/kube-apiserver --etcd-servers=http://127.0.0.1:$EP --bind-address=127.0.0.1 \
     --advertise-address=127.0.0.1 --secure-port="$PORT" --cert-dir="$R"/pki/serving \
     --service-cluster-ip-range=10.96.0.0/24 --service-account-issuer=https://kubernetes.default.svc \
     --service-account-key-file="$R"/pki/sa.pub --service-account-signing-key-file="$R"/pki/sa.key \
     --token-auth-file="$R"/pki/tokens.csv --authorization-mode=RBAC --endpoint-reconciler-type=none \
     >"$R"/apiserver.log 2>&1 &
  echo $! > "$R"/apiserver.pid
  for _ in $(seq 60); do
    curl -sfk -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -sfk -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$PORT/readyz" >/dev/null \
    || { echo "k8s-testenv: apiserver not ready; see $R/apiserver.log" >&2; exit 1; }
  "$W"/bin/kube-controller-manager --kubeconfig="$R"/kubeconfig \
     --controllers=deployment,replicaset,endpoint,endpointslice,serviceaccount,serviceaccount-token \
     --service-account-private-key-file="$R"/pki/sa.key --leader-elect=false \
     --bind-address=127.0.0.1 --secure-port=0 --port=0 >"$R"/kcm.log 2>&1 &
  echo $! > "$R"/kcm.pid
  echo "$R/kubeconfig"
  ;;
stop)
  for p in kcm apiserver etcd; do
    [[ -f $R/$p.pid ]] && kill "$(cat "$R/$p.pid")" 2>/dev/null || true
    rm -f "$R/$p.pid"
  done
  ;;
env)
  echo "KUBECONFIG=$R/kubeconfig"; echo "K8S_TOKEN=$TOKEN"; echo "K8S_API=https://127.0.0.1:$PORT"
  ;;
*) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
