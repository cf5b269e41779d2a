#!/usr/bin/env bash
# A local Kubernetes control plane with Palisade installed, on loopback only:
#   etcd + kube-apiserver (the default admission plugins of a real cluster, Pod Security
#   included, plus NodeRestriction; RBAC; a service-account token signer) and the Palisade
#   webhook server running from this checkout (`python -m injector serve`).
# No kubelet, scheduler or controller-manager: pods are admitted and stored, never run.
#
#   scripts/cluster.sh up        start, install Palisade, print the kubeconfig path (last line)
#   scripts/cluster.sh down      stop everything `up` started and remove the state directory
#   scripts/cluster.sh restart-apiserver | webhook-stop | webhook-start   (used by tests/k8s)
#
# How the API server reaches the webhook: the generated manifests are applied unchanged, so
# the webhooks name the Service palisade-injector.palisade-system port 443. The API server
# resolves a webhook Service to its ClusterIP. The service range is carved out of 127.0.0.0/8
# (PALISADE_K8S_SERVICE_CIDR), so the ClusterIP the Service gets is a loopback address of this
# host and the webhook server simply listens on it, port 443 (root, or a lowered
# net.ipv4.ip_unprivileged_port_start). TLS is checked against the Service's DNS name with the
# caBundle from `python -m injector certs`, as in a cluster.
#
# Environment: PALISADE_K8S_DIR (state, default /tmp/palisade-k8s), PALISADE_K8S_PORT (API
# server, 16443), PALISADE_K8S_ETCD_PORT (23790; peer port +10), PALISADE_K8S_SERVICE_CIDR
# (127.0.96.0/24), PALISADE_K8S_BIN (prebuilt binaries; default: scripts/build-k8s.sh),
# PALISADE_K8S_INSTALL (manifests | none, default manifests), PALISADE_K8S_FAILURE_POLICY
# (Fail | Ignore, default Fail).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PALISADE_K8S_DIR:-/tmp/palisade-k8s}"
API_PORT="${PALISADE_K8S_PORT:-16443}"
ETCD_PORT="${PALISADE_K8S_ETCD_PORT:-23790}"
PEER_PORT=$((ETCD_PORT + 10))
SVC_CIDR="${PALISADE_K8S_SERVICE_CIDR:-127.0.96.0/24}"
INSTALL="${PALISADE_K8S_INSTALL:-manifests}"
FAILURE_POLICY="${PALISADE_K8S_FAILURE_POLICY:-Fail}"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
KUBECONFIG_FILE="$STATE/kubeconfig"
PKI="$STATE/pki"
LOGS="$STATE/logs"

say() { echo "cluster: $*" >&2; }
die() { say "$*"; exit 1; }

bin_dir() {
    if [ -n "${PALISADE_K8S_BIN:-}" ]; then echo "$PALISADE_K8S_BIN"; return; fi
    if [ -f "$STATE/bin" ]; then cat "$STATE/bin"; return; fi
    bash "$ROOT/scripts/build-k8s.sh" | tail -1
}

wait_for() {  # wait_for SECONDS NAME COMMAND... : until COMMAND succeeds, while process NAME lives
    local limit="$1" what="$2"; shift 2
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$(cat "$STATE/$what.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
            tail -3 "$LOGS/$what.log" >&2 || true
            die "$what exited (log: $LOGS/$what.log)"
        fi
        [ "$(date +%s)" -lt "$deadline" ] || die "$what not ready after ${limit}s (logs in $LOGS)"
        sleep 0.2
    done
}

start_bg() {  # start_bg NAME COMMAND... : detached, own session, pid in $STATE/NAME.pid
    local name="$1"; shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/$name.pid"
}

stop_bg() {  # stop_bg NAME : SIGTERM, then SIGKILL after 10 s; only the pid we recorded
    local name="$1" pid
    [ -f "$STATE/$name.pid" ] || return 0
    pid="$(cat "$STATE/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
}

make_pki() {
    mkdir -p "$PKI"
    local svc_ip; svc_ip="$("$PY" -c 'import ipaddress,sys; print(next(ipaddress.ip_network(sys.argv[1]).hosts()))' "$SVC_CIDR")"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=palisade-k8s-ca" \
        -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
    issue() {  # issue NAME SUBJECT [SAN]
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
            -keyout "$PKI/$1.key" -out "$PKI/$1.csr" 2>/dev/null
        local ext="$PKI/$1.ext"
        echo "basicConstraints=CA:FALSE" > "$ext"
        echo "keyUsage=digitalSignature,keyEncipherment" >> "$ext"
        if [ -n "${3:-}" ]; then
            echo "extendedKeyUsage=serverAuth" >> "$ext"; echo "subjectAltName=$3" >> "$ext"
        else
            echo "extendedKeyUsage=clientAuth" >> "$ext"
        fi
        openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
            -days 30 -extfile "$ext" -out "$PKI/$1.crt" 2>/dev/null
    }
    issue apiserver "/CN=kube-apiserver" \
        "IP:127.0.0.1,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    issue admin "/O=system:masters/CN=palisade-admin"
    # the API server's own client certificate for calling webhooks is not needed (no client auth there)
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$PKI/sa.key" 2>/dev/null
    openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
    chmod 600 "$PKI"/*.key
}

write_kubeconfig() {
    cat > "$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: palisade-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: palisade-admin
  user:
    client-certificate: $PKI/admin.crt
    client-key: $PKI/admin.key
contexts:
- name: palisade-local
  context: {cluster: palisade-local, user: palisade-admin}
current-context: palisade-local
EOF
    chmod 600 "$KUBECONFIG_FILE"
}

start_etcd() {
    start_bg etcd etcd --name palisade --data-dir "$STATE/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-cluster "palisade=http://127.0.0.1:$PEER_PORT" \
        --quota-backend-bytes 4294967296 --logger zap --log-level warn
    wait_for 30 etcd curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
}

apiserver_ready() {
    curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
        "https://127.0.0.1:$API_PORT/readyz"
}

start_apiserver() {
    local bin; bin="$(cat "$STATE/bin")"
    start_bg apiserver "$bin/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
        --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --client-ca-file "$PKI/ca.crt" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
        --service-cluster-ip-range "$SVC_CIDR" \
        --authorization-mode Node,RBAC \
        --enable-admission-plugins NodeRestriction \
        --allow-privileged=true \
        --profiling=false \
        --v 1
    wait_for 90 apiserver apiserver_ready
}

kubectl_() { "$(cat "$STATE/bin")/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

webhook_ip() { kubectl_ -n palisade-system get service palisade-injector -o 'jsonpath={.spec.clusterIP}'; }

start_webhook() {
    local ip; ip="$(webhook_ip)"
    [ -n "$ip" ] || die "service palisade-system/palisade-injector has no ClusterIP"
    start_bg webhook "$PY" -m injector serve --cert "$STATE/webhook-certs/tls.crt" \
        --key "$STATE/webhook-certs/tls.key" --host "$ip" --port 443
    wait_for 30 webhook curl -fsS --cacert "$STATE/webhook-certs/ca.crt" \
        --resolve "palisade-injector.palisade-system.svc:443:$ip" \
        https://palisade-injector.palisade-system.svc/readyz
    echo "$ip" > "$STATE/webhook-ip"
}

install_palisade() {
    if [ "$(id -u)" != 0 ] && [ "$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)" -gt 443 ]; then
        die "the webhook listens on port 443 of the Service's ClusterIP: run as root (or PALISADE_K8S_INSTALL=none)"
    fi
    (cd "$ROOT" && "$PY" -m injector certs --service palisade-injector --namespace palisade-system \
        -o "$STATE/webhook-certs" >/dev/null)
    # The webhook server runs with the default config, which is what the manifests ship.
    (cd "$ROOT" && "$PY" -m injector manifests --certs-dir "$STATE/webhook-certs" \
        --failure-policy "$FAILURE_POLICY" -o "$STATE/palisade.yaml")
    kubectl_ apply --server-side --field-manager palisade-install -f "$STATE/palisade.yaml" >"$LOGS/install.log"
    start_webhook
}

cmd_up() {
    if [ -f "$STATE/apiserver.pid" ] && kill -0 "$(cat "$STATE/apiserver.pid")" 2>/dev/null; then
        say "already up"; echo "$KUBECONFIG_FILE"; return
    fi
    command -v etcd >/dev/null || die "etcd not found (apt-get install etcd-server)"
    local start; start=$(date +%s)
    rm -rf "$STATE"
    mkdir -p "$STATE" "$LOGS"
    chmod 700 "$STATE"
    # a failed `up` stops what it started (the logs stay for the reason)
    trap 'say "up failed: stopping what it started (logs in $LOGS)"; stop_bg webhook; stop_bg apiserver; stop_bg etcd' EXIT
    bin_dir > "$STATE/bin.tmp" && mv "$STATE/bin.tmp" "$STATE/bin"
    [ -x "$(cat "$STATE/bin")/kube-apiserver" ] || die "no kube-apiserver in $(cat "$STATE/bin")"
    make_pki
    write_kubeconfig
    start_etcd
    start_apiserver
    say "control plane up in $(( $(date +%s) - start ))s (API server https://127.0.0.1:$API_PORT)"
    if [ "$INSTALL" = manifests ]; then
        install_palisade
        say "Palisade installed (webhook on $(cat "$STATE/webhook-ip"):443, failurePolicy $FAILURE_POLICY)"
    fi
    trap - EXIT
    echo "$KUBECONFIG_FILE"
}

cmd_down() {
    [ -d "$STATE" ] || return 0
    stop_bg webhook
    stop_bg apiserver
    stop_bg etcd
    rm -rf "$STATE"
    say "down"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    restart-apiserver) stop_bg apiserver; start_apiserver; echo "$KUBECONFIG_FILE" ;;
    webhook-stop) stop_bg webhook ;;
    webhook-start) start_webhook ;;
    *) echo "usage: $0 up|down|restart-apiserver|webhook-stop|webhook-start" >&2; exit 2 ;;
esac
