"""A small, fully known week of events for the report tests (and its policy and identity files).

Every count the tests assert is visible here: change a number here and the
matching assertion must change too.
"""

from __future__ import annotations

import json
from pathlib import Path

# The DESIGN.md reference example, as written (last reviewed 2026-11-01).
POLICY = """\
apiVersion: palisade.dev/v1
kind: FirewallPolicy
metadata:
  name: payment-api
  namespace: payments
  annotations:
    palisade.dev/last-reviewed: "2026-11-01"     # PCI DSS 1.2.7: reviewed every 6 months
spec:
  selector:
    matchLabels: {app: payment-api}
  mode: protect                # learn | monitor | protect
  default: deny                # what happens to traffic no rule matches
  ingress:
    - name: checkout-to-payments
      description: Checkout submits charges (business justification, shown to auditors)
      from:
        - namespace: shop
          labels: {app: checkout}
      ports: [{port: 9000, protocol: TCP}]
      appProto: http
      http:
        - methods: [POST]
          pathPrefix: /v1/charge
      action: allow
  egress:
    - name: payments-to-db
      to:
        - labels: {app: payments-db}
      ports: [{port: 5432}]
      action: allow
    - name: card-network
      to:
        - fqdn: "*.card-network.example"
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
kind: ClusterFirewallPolicy
metadata:
  name: baseline
spec:
  rules:
    - name: no-ssh-into-containers
      direction: ingress
      appProto: ssh
      action: deny
"""

SCOPE = "pci.palisade.dev/scope"
PAY = {"namespace": "payments", "pod": "payment-api-5f6d7c8b9-xyz12",
       "labels": {"app": "payment-api", SCOPE: "cde"}, "scope": "cde", "service_account": "payment-api"}
CHECKOUT = {"namespace": "shop", "pod": "checkout-7d9f8b6c5-abcde",
            "labels": {"app": "checkout", SCOPE: "connected"}, "scope": "connected"}
BLOG = {"namespace": "marketing", "pod": "blog-6c7d8e9f0-qwert", "labels": {"app": "blog"}}  # no scope label
PAY_IP, CHECKOUT_IP, BLOG_IP, DB_IP, CARDNET_IP = "10.0.2.7", "10.0.1.5", "10.0.3.9", "10.0.2.8", "198.51.100.20"

IDENTITY = f"""\
- ip: {DB_IP}
  namespace: payments
  pod: payments-db-0
  labels: {{app: payments-db, {SCOPE}: cde}}
- ip: 10.0.2.50
  namespace: payments
  pod: vault-0
  labels: {{app: vault, {SCOPE}: cde}}
"""

FULL_PAN = "4111111111111111"        # test PAN (Luhn valid)
FULL_PAN_2 = "5555555555554444"      # test PAN (Luhn valid)
MASKED_PAN = "411111******1111"
START = "2026-11-20T08:00:00.000000+0000"
END = "2026-11-26T18:30:00.000000+0000"


def _flow(ts, direction, src_ip, dst_ip, port, src, dst, verdict, rule, app="unknown", enc=False,
          bts=100, btc=200, mode="protect"):
    return {"timestamp": ts, "event_type": "flow", "flow_id": abs(hash((ts, src_ip, port))) % 10**9,
            "direction": direction, "src_ip": src_ip, "src_port": 40000, "dest_ip": dst_ip, "dest_port": port,
            "proto": "TCP", "app_proto": app, "verdict": verdict, "rule": rule, "mode": mode, "encrypted": enc,
            "close_reason": "fin", "src_workload": src, "dest_workload": dst,
            "flow": {"bytes_toserver": bts, "bytes_toclient": btc, "start": ts, "end": ts}}


def events() -> list[dict | str]:
    ev: list[dict | str] = []
    # 5 allowed charges checkout -> payment-api (plaintext http), the first one is the window start
    for i in range(5):
        ts = START if i == 0 else f"2026-11-2{i}T09:00:00.000000+0000"
        ev.append(_flow(ts, "inbound", CHECKOUT_IP, PAY_IP, 9000, CHECKOUT, PAY, "allow", "checkout-to-payments",
                        app="http"))
    # 3 allowed payment-api -> db; the db appears only by IP (identity file names it); qualified rule name
    for i in range(3):
        ev.append(_flow(f"2026-11-22T1{i}:00:00.000000+0000", "outbound", PAY_IP, DB_IP, 5432, PAY,
                        {"world": True, "ip": DB_IP, "scope": "out-of-scope"}, "allow",
                        "payment-api/payments-to-db", app="pgsql"))
    # 1 allowed, encrypted, to the card network (outside the cluster)
    ev.append(_flow("2026-11-23T12:00:00.000000+0000", "outbound", PAY_IP, CARDNET_IP, 443, PAY,
                    {"world": True, "ip": CARDNET_IP, "scope": "out-of-scope"}, "allow", "card-network",
                    app="tls", enc=True, bts=1000, btc=3000))
    # 4 denied attempts blog -> payment-api; the last one is the window end
    for i, ts in enumerate(["2026-11-24T03:00:00.000000+0000", "2026-11-24T03:00:01.000000+0000",
                            "2026-11-25T03:00:00.000000+0000", END]):
        ev.append(_flow(ts, "inbound", BLOG_IP, PAY_IP, 9000 if i < 3 else 22, BLOG, PAY, "deny", "default-deny",
                        bts=0, btc=0))
    ev.append({"timestamp": "2026-11-24T03:00:00.000000+0000", "event_type": "alert", "direction": "inbound",
               "src_ip": BLOG_IP, "dest_ip": PAY_IP, "dest_port": 9000, "proto": "TCP", "src_workload": BLOG,
               "dest_workload": PAY, "alert": {"action": "blocked", "signature": "default-deny", "signature_id": 0,
                                              "category": "policy", "severity": 2}})
    # DLP: a PAN leaving the CDE towards the blog; this (buggy, older) sidecar forgot to mask it
    ev.append({"timestamp": "2026-11-25T10:00:00.000000+0000", "event_type": "alert", "flow_id": 77,
               "direction": "outbound", "src_ip": PAY_IP, "src_port": 41000, "dest_ip": BLOG_IP, "dest_port": 80,
               "proto": "TCP", "app_proto": "http", "src_workload": PAY, "dest_workload": BLOG,
               "alert": {"action": "blocked", "signature": "no-clear-pan-out-of-cde", "signature_id": 9001,
                         "category": "dlp", "severity": 1},
               "dlp": {"rule_id": "payment_cards.visa", "type": "credit_card", "pack": "payment_cards",
                       "masked": FULL_PAN, "offset": 12, "direction": "toserver",
                       "context": f"card={FULL_PAN}", "confidence": "high"}})
    # a rule name carrying a PAN (rendered in the "unmatched rules" table): must come out masked
    ev.append(_flow("2026-11-25T11:00:00.000000+0000", "inbound", BLOG_IP, PAY_IP, 9000, BLOG, PAY, "deny",
                    f"weird {FULL_PAN_2[:4]} {FULL_PAN_2[4:8]} {FULL_PAN_2[8:12]} {FULL_PAN_2[12:]}", bts=0, btc=0))
    # noise the report must survive: unknown types, missing optional fields, garbage
    ev.append({"timestamp": "2026-11-25T12:00:00.000000+0000", "event_type": "pcap", "state": "started"})
    ev.append({"event_type": "flow", "verdict": "allow"})  # no timestamp, no workloads, no ports
    ev.append({"event_type": "alert"})
    ev.append("this is not json")
    ev.append("[1, 2, 3]")
    return ev


def write_inputs(d: Path) -> dict[str, Path]:
    paths = {"policy": d / "policy.yaml", "events": d / "eve.jsonl", "identity": d / "identity.yaml"}
    paths["policy"].write_text(POLICY)
    paths["identity"].write_text(IDENTITY)
    with open(paths["events"], "w") as fh:
        for e in events():
            fh.write((e if isinstance(e, str) else json.dumps(e)) + "\n")
    return paths
