"""Shared identities and the table-test policy (the DESIGN.md example, extended)."""

from __future__ import annotations

import pathlib

from firewall.identity.identity import Identity

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "payment-api.yaml"

SCOPE = "pci.palisade.dev/scope"
PAY = Identity.make("10.0.0.5", "payments", "payment-api-0", {"app": "payment-api", SCOPE: "cde"})
DB = Identity.make("10.0.0.6", "payments", "db-0", {"app": "payments-db", SCOPE: "cde"})
CHK = Identity.make("10.0.1.5", "shop", "checkout-0", {"app": "checkout", SCOPE: "connected"})
BATCH = Identity.make("10.0.1.9", "shop", "batch-0", {"app": "batch", SCOPE: "connected"})
WEB = Identity.make("10.0.1.20", "shop", "web-0", {"app": "web"})
OTHER = Identity.make("10.0.1.30", "shop", "other-0", {"app": "other"})
PROM = Identity.make("10.0.2.1", "monitoring", "prom-0", {"app": "prometheus"})
PROM_C = Identity.make("10.0.2.2", "monitoring", "prom-1", {"app": "prometheus", SCOPE: "connected"})
VAULT = Identity.make("10.0.3.1", "secure", "vault-0", {"app": "vault", SCOPE: "cde"})
KDNS = Identity.make("10.96.0.10", "kube-system", "coredns-0", {"k8s-app": "kube-dns"})
PARTNER = Identity("198.51.100.7")
STRANGER = Identity("203.0.113.9")
METADATA = Identity("169.254.169.254")
CARDNET = Identity("192.0.2.44")
NODE = Identity("10.1.0.1")

TABLE_POLICY = """\
apiVersion: palisade.dev/v1
kind: ClusterFirewallPolicy
metadata: {name: baseline}
spec:
  rules:
    - name: allow-monitoring
      direction: ingress
      from: [{namespace: monitoring, labels: {app: prometheus}}]
      ports: [{port: 9090}]
      action: allow
    - name: no-ssh-into-containers
      direction: ingress
      appProto: ssh
      action: deny
    - name: deny-telnet
      direction: ingress
      ports: [{port: 23}]
      action: deny
    - name: block-metadata
      direction: egress
      to: [{cidr: 169.254.169.254/32}]
      action: deny
    - name: cluster-dns
      direction: egress
      to: [{namespace: kube-system, labels: {k8s-app: kube-dns}}]
      ports: [{port: 53, protocol: UDP}, {port: 53}]
      action: allow
---
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: payment-api, namespace: payments}
spec:
  selector: {matchLabels: {app: payment-api}}
  mode: protect
  default: deny
  ingress:
    - name: checkout-to-payments
      from: [{namespace: shop, labels: {app: checkout}}]
      ports: [{port: 9000, protocol: TCP}]
      appProto: http
      http: [{methods: [POST], pathPrefix: /v1/charge}]
      action: allow
    - name: deny-batch
      from: [{labels: {app: batch}}]
      ports: [{port: 9000}]
      action: deny
    - name: shop-alert
      from: [{namespace: shop}]
      ports: [{port: 9000}]
      action: alert
    - name: partner
      description: Card partner callbacks (contract 2026-17)
      from: [{cidr: 198.51.100.0/24}]
      ports: [{port: 9443}]
      action: allow
      exception: true
    - name: monitoring-deny
      from: [{namespace: monitoring}]
      ports: [{port: 9090}]
      action: deny
    - name: connected-range
      from: [{scope: connected}]
      ports: [{port: 8000, endPort: 8010}]
      action: allow
      capture: true
    - name: grpc-only
      from: [{namespace: shop}]
      ports: [{port: 7000}]
      appProto: grpc
      action: allow
  egress:
    - name: payments-to-db
      to: [{labels: {app: payments-db}}]
      ports: [{port: 5432}]
      action: allow
    - name: card-network
      to: [{fqdn: "*.card-network.example"}]
      ports: [{port: 443}]
      tls: {minVersion: "1.2"}
      action: allow
  dlp:
    - name: no-clear-pan-out-of-cde
      packs: [payment_cards]
      direction: egress
      to: [{scope: out-of-scope}, {scope: connected}]
      action: block
---
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mode: monitor
  egress:
    - name: web-to-checkout
      to: [{labels: {app: checkout}}]
      ports: [{port: 80}]
      action: allow
"""


def write(tmp_path: pathlib.Path, text: str, name: str = "policy.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)
