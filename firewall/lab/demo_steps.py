"""The demo's eight steps, each checking what it narrates (``python -m firewall demo``).

``DemoSteps`` is mixed into ``firewall.lab.demo.Demo``, which owns the plumbing (the lab cluster,
the sidecars, the command runner) and the driver that runs ``STEPS`` in order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from firewall import ADMIN_PORT, ANN_MODE, ANN_PCAP, ANN_QUARANTINE, LABEL_SCOPE
from firewall.lab.demo_assets import (
    API_PORT,
    CAPTURE_SPEC,
    COLLECT_PORT,
    COLLECTOR,
    GUARDRAILS,
    HOLDER,
    NGINX_CONF,
    PY_API,
    REDIS_PORT,
    SSH_PORT,
    TEST_PAN,
    TEST_PAN_MASKED,
    review_learned,
)
from firewall.lab.netns import PY, Pod, sh, wait_until

EVENT_WAIT = 15.0  # seconds a step waits for an event or flow record


class DemoSteps:
    """The steps, in the order ``STEPS`` runs them; each narrates and checks through ``self.n``."""

    def step_cluster(self) -> None:
        n = self.n
        assert n is not None
        self.make_cluster()
        pods = {
            "payments": ("payment-api-0", "payments", {"app": "payment-api", LABEL_SCOPE: "cde"}),
            "db": ("payments-db-0", "payments", {"app": "payments-db", LABEL_SCOPE: "cde"}),
            "checkout": ("checkout-0", "shop", {"app": "checkout", LABEL_SCOPE: "connected"}),
            "analytics": ("analytics-0", "analytics", {"app": "analytics", LABEL_SCOPE: "out-of-scope"}),
        }
        for key, (name, ns, labels) in pods.items():
            pod = self.cluster.pod(key, ns, name=name, labels=labels)
            n.say(f"pod [bold]{ns}/{name}[/bold] {pod.ip:<12} scope [magenta]{pod.scope}[/magenta]"
                  f"  (network namespace {pod.netns})")
        ident = [{"ip": p.ip, "namespace": p.namespace, "pod": p.name, "labels": p.labels} for p in self.pods.values()]
        (self.workdir / "identity.yaml").write_text(yaml.safe_dump(ident, sort_keys=False))
        for key in ("payments", "db"):
            pcap = self.workdir / f"pcap-{key}"
            pcap.mkdir()
            os.chown(pcap, 1337, 1337)  # the sidecar drops to UID/GID 1337 and writes captures there
        self.dlp_cache = self.out / ".dlp-cache"
        self.dlp_cache.mkdir(parents=True, exist_ok=True)

        pay, db, ana = self.pods["payments"], self.pods["db"], self.pods["analytics"]
        ng = self.workdir / "nginx"
        ng.mkdir()
        self.access_log = ng / "access.log"
        if shutil.which("nginx"):
            (ng / "nginx.conf").write_text(NGINX_CONF.format(d=ng, port=API_PORT))
            proc = self.serve(pay, ["nginx", "-c", str(ng / "nginx.conf")], "nginx.log")
            self.nginx = True
        else:
            proc = self.serve(pay, [PY, "-c", PY_API, str(API_PORT), str(self.access_log)], "api.log")
        pay.wait_listening(API_PORT, proc=proc)
        n.check(True, f"payment API ({'nginx' if self.nginx else 'python http.server'}) listening on "
                      f"{pay.ip}:{API_PORT}")
        ssh = self.workdir / "ssh"
        ssh.mkdir()
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "hostkey")])
        (ssh / "sshd_config").write_text(f"Port {SSH_PORT}\nHostKey {ssh}/hostkey\nPidFile {ssh}/sshd.pid\n"
                                         "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n")
        os.makedirs("/run/sshd", exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        proc = self.serve(pay, [sshd, "-D", "-e", "-f", str(ssh / "sshd_config")], "sshd.log")
        pay.wait_listening(SSH_PORT, proc=proc)
        n.check(True, f"sshd listening on {pay.ip}:{SSH_PORT} (left there by someone debugging)")
        rd = self.workdir / "redis"
        rd.mkdir()
        proc = self.serve(db, ["redis-server", "--port", str(REDIS_PORT), "--bind", "0.0.0.0",
                                       "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                       "--dir", str(rd)], "redis.log")
        db.wait_listening(REDIS_PORT, proc=proc)
        n.check(True, f"Redis listening on {db.ip}:{REDIS_PORT}")
        self.collected = self.workdir / "analytics-received.txt"
        proc = self.serve(ana, [PY, "-c", COLLECTOR, str(COLLECT_PORT), str(self.collected)], "collector.log")
        ana.wait_listening(COLLECT_PORT, proc=proc)
        n.check(True, f"analytics collector listening on {ana.ip}:{COLLECT_PORT}")

    def _inject(self) -> None:
        n = self.n
        assert n is not None
        for key in ("payments", "db"):
            pod = self.pods[key]
            n.command(["python", "-m", "firewall", "redirect", "apply"], f"[{pod.name}]")
            r = pod.redirect("apply", check=False, timeout=30)
            n.check(r.returncode == 0, f"{pod.name}: nftables table inet palisade and policy routing installed"
                    + ("" if r.returncode == 0 else f" (rc {r.returncode}: {r.stderr.strip()[-300:]})"))

    def _traffic_learn(self) -> None:
        pay, db, chk, ana = (self.pods[k] for k in ("payments", "db", "checkout", "analytics"))
        for i in range(3):
            r = self.curl(chk, "-X", "POST", "-d", f"order={1000 + i}&amount=4{i}.00", "-o", "/dev/null",
                          "-w", "%{http_code}", f"http://{pay.ip}:{API_PORT}/v1/charge", show=i == 0)
            self.n.check(r.stdout == "200", f"checkout -> payment-api POST /v1/charge: HTTP {r.stdout or r.returncode}")
        for i, args in enumerate((["SET", "order:1000", "charged"], ["GET", "order:1000"])):
            cmd = ["redis-cli", "-h", db.ip, "-p", str(REDIS_PORT), *args]
            if i == 0:
                self.n.command(cmd, f"[{pay.name}]")
            r = self.run_in(pay, cmd)
            self.n.check(r.returncode == 0 and r.stdout.strip() in ("OK", "charged"),
                         f"payment-api -> payments-db redis {args[0]}: {r.stdout.strip() or r.stderr.strip()}")
        for i in range(2):
            r = self.curl(pay, "-X", "POST", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"event": "charge", "count": i + 1}), "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://{ana.ip}:{COLLECT_PORT}/collect", show=i == 0)
            self.n.check(r.stdout == "200", f"payment-api -> analytics POST /collect: HTTP {r.stdout or r.returncode}")
        r = self.ssh(chk, pay)
        self.n.check(r.returncode != 0, "checkout -> payment-api ssh: someone tried to log in (auth failed, "
                                        "but the session was recorded)")

    def ssh(self, src: Pod, dst: Pod) -> subprocess.CompletedProcess:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=5", "-p", str(SSH_PORT), f"nobody@{dst.ip}", "true"]
        self.n.command(cmd, f"[{src.name}]")
        return self.run_in(src, cmd, timeout=20)

    def step_learn(self) -> None:
        n = self.n
        assert n is not None
        self._inject()
        for key in ("payments", "db"):
            self.set_annotations(key, mode="learn")
        n.say(f"annotation [yellow]{ANN_MODE}: learn[/yellow] on both CDE pods; no policy loaded yet")
        scs = self.start_sidecars("learn", None)
        n.check(True, "sidecars ready (listeners bound as root, then dropped to UID 1337)")
        self._traffic_learn()
        pay_sc, db_sc = scs
        flows = pay_sc.wait_flows(8, EVENT_WAIT, what="8 flow records from the payment-api sidecar")
        db_sc.wait_flows(2, EVENT_WAIT, dest_port=REDIS_PORT, what="2 flow records from the payments-db sidecar")
        n.check(all(f.get("mode") == "learn" and f.get("verdict") == "allow" for f in flows),
                f"{len(flows)} flows recorded in learn mode, all allowed, with app_proto "
                f"{sorted({f.get('app_proto') for f in flows})}")
        self.stop_sidecars()
        ev_dir = self.out / "events"
        ev_dir.mkdir(exist_ok=True)
        learn_events = []
        for sc in scs:
            learn_events.append(str(ev_dir / sc.events_path.name))
            shutil.copyfile(sc.events_path, learn_events[-1])
        learned = self.out / "learned-policy.yaml"
        r = self.cli(["policy", "learn", "--events", *learn_events, "-o", str(learned)])
        n.check(r.returncode == 0 and learned.exists(), f"policy learn wrote {learned}"
                + ("" if r.returncode == 0 else f": {r.stderr.strip()}"))
        text = learned.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        by_app = {d["spec"]["selector"]["matchLabels"].get("app"): d for d in docs}
        n.check(set(by_app) == {"payment-api", "payments-db"},
                f"one FirewallPolicy per workload: {', '.join(d['metadata']['name'] for d in docs)}")
        ing = by_app["payment-api"]["spec"].get("ingress", [])
        http = [r for r in ing if r.get("appProto") == "http"]
        n.check(bool(http) and http[0].get("http") == [{"methods": ["POST"], "pathPrefix": "/v1/charge"}],
                "checkout -> payment-api learned as: HTTP POST /v1/charge on 9000 only")
        eg = {r.get("appProto") for r in by_app["payment-api"]["spec"].get("egress", [])}
        n.check({"redis", "http"} <= eg, "egress learned: redis to payments-db, http to analytics")
        reviewed, nj = review_learned(text, self.today)
        poldir = self.out / "policies"
        poldir.mkdir(exist_ok=True)
        (poldir / "payments-learned-reviewed.yaml").write_text(reviewed)
        (poldir / "baseline.yaml").write_text(GUARDRAILS.format(today=self.today))
        n.say(f"reviewed: {nj} rules got a business justification, last-reviewed {self.today}; plus the guard "
              "rails (no SSH into containers, no clear card numbers out of the CDE)")
        r = self.cli(["policy", "validate", str(poldir)])
        n.check(r.returncode == 0, f"policy validate: {r.stdout.strip() or r.stderr.strip()}")
        self.policy_dir = poldir
        # what the sidecar reads is a copy in the world-readable work dir: it re-reads the files after
        # dropping to UID 1337 (a mounted ConfigMap in Kubernetes), and --out may be under /root
        self.runtime_policy = self.workdir / "policies"
        shutil.copytree(poldir, self.runtime_policy)

    def step_protect(self) -> None:
        n = self.n
        assert n is not None
        for key in ("payments", "db"):
            self.set_annotations(key, mode=None)
        n.say(f"annotation {ANN_MODE} removed; sidecars restarted with the policies of {self.policy_dir}")
        self.sidecars = self.start_sidecars("protect", self.runtime_policy)
        pay, chk, ana = self.pods["payments"], self.pods["checkout"], self.pods["analytics"]
        sc = self.sidecars[0]
        url = f"http://{pay.ip}:{API_PORT}/v1/charge"
        r = self.curl(chk, "-X", "POST", "-d", "order=2000&amount=12.00", "-o", "/dev/null", "-w", "%{http_code}", url)
        n.check(r.stdout == "200", f"checkout -> payment-api POST /v1/charge: HTTP {r.stdout or 'no answer'} (allowed)")
        f = sc.wait_flows(1, EVENT_WAIT, src_ip=chk.ip, dest_port=API_PORT, what="the checkout flow record")[-1]
        n.check(f["verdict"] == "allow" and f["rule"] not in ("learn", "default-allow"),
                f"flow record: verdict {f['verdict']}, rule {f['rule']}, {f['src_workload'].get('scope')} -> "
                f"{f['dest_workload'].get('scope')}")
        r = self.curl(chk, "-o", "/dev/null", "-w", "%{http_code}", f"http://{pay.ip}:{API_PORT}/admin/users")
        n.check(r.stdout == "403", f"checkout -> payment-api GET /admin/users: HTTP {r.stdout or 'no answer'} "
                                   "(never learned: the sidecar answers 403, nginx never sees it)")
        r = self.curl(ana, "-X", "POST", "-d", "amount=1", "-w", "%{http_code}", url)
        n.check(r.returncode in (7, 52, 56) and "200" not in r.stdout,
                f"analytics -> payment-api: connection {'reset' if r.returncode != 7 else 'refused'} "
                f"(curl exit {r.returncode})")
        f = sc.wait_flows(1, EVENT_WAIT, src_ip=ana.ip, what="the analytics flow record")[-1]
        n.check(f["verdict"] == "deny" and f["rule"] == "cde-segmentation",
                f"flow record: verdict {f['verdict']}, rule {f['rule']} (out-of-scope may never reach the CDE)")
        a = sc.wait_event(lambda e: e.get("event_type") == "alert" and e.get("src_ip") == ana.ip, EVENT_WAIT,
                          what="the deny alert")
        n.check(a["alert"]["action"] == "blocked", f"alert: {a['alert']['signature']} {a['alert']['action']}")
        log = self.access_log.read_text() if self.access_log.exists() else ""
        n.check(ana.ip not in log, "the payment API's access log has no line from analytics: not one byte arrived")
        r = self.ssh(chk, pay)
        n.check(r.returncode != 0, "checkout -> payment-api ssh: refused")
        f = sc.wait_flows(1, EVENT_WAIT, dest_port=SSH_PORT, what="the ssh flow record")[-1]
        n.check(f["verdict"] == "deny" and f["app_proto"] == "ssh" and f["rule"] == "no-ssh-into-containers",
                f"flow record: app_proto {f['app_proto']}, verdict {f['verdict']}, rule {f['rule']} "
                "(the cluster baseline beats the learned allow)")

    def step_dlp(self) -> None:
        n = self.n
        assert n is not None
        pay, ana = self.pods["payments"], self.pods["analytics"]
        sc = self.sidecars[0]
        before = self.collected.read_text() if self.collected.exists() else ""
        body = json.dumps({"event": "charge", "order": 2000, "card": TEST_PAN, "exp": "12/29"})
        r = self.curl(pay, "-X", "POST", "-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}",
                      f"http://{ana.ip}:{COLLECT_PORT}/collect")
        code = r.stdout.strip().rsplit("\n", 1)[-1]
        n.check(code == "403", f"payment-api -> analytics POST /collect with a card number: HTTP {code or 'none'} "
                               "(the egress rule allows the flow; DLP blocks the request)")
        a = sc.wait_event(lambda e: e.get("event_type") == "alert" and e["alert"].get("category") == "dlp",
                          EVENT_WAIT, what="the DLP alert")
        d = a.get("dlp", {})
        n.check(a["alert"]["action"] == "blocked" and d.get("masked") == TEST_PAN_MASKED,
                f"alert: {a['alert']['signature']} {a['alert']['action']}, {d.get('rule_id')} "
                f"value {d.get('masked')} (first 6 / last 4, PCI DSS 3.4.1)")
        wait_until(lambda: self.collected.exists() and len(self.collected.read_text()) > len(before), 10,
                   what="the collector to log the connection")
        got = self.collected.read_text()[len(before):]
        n.check("[PAN-RECEIVED" not in got, "the analytics collector received the request head but no card number")
        leaked = [p.name for p in self.workdir.glob("*.eve.json") if TEST_PAN in p.read_text(errors="replace")]
        leaked += [p.name for p in self.workdir.glob("*.log") if TEST_PAN in p.read_text(errors="replace")]
        n.check(not leaked, "no event file and no log holds the full number")
        f = sc.wait_flows(1, EVENT_WAIT, dest_port=COLLECT_PORT, close_reason="dlp-block",
                          what="the blocked flow record")[-1]
        n.check(f["verdict"] == "deny", f"flow record: verdict {f['verdict']}, close_reason {f['close_reason']}")

    def step_capture(self) -> None:
        n = self.n
        assert n is not None
        pay, chk = self.pods["payments"], self.pods["checkout"]
        sc = self.sidecars[0]
        self.set_annotations("payments", pcap=CAPTURE_SPEC)
        n.say(f'annotation [yellow]{ANN_PCAP}: "{CAPTURE_SPEC}"[/yellow] on payment-api-0 (the kubelet swaps '
              "the downward-API files; the sidecar watches the directory)")
        st = sc.wait_event(lambda e: e.get("event_type") == "pcap" and e["pcap"]["state"] == "started",
                           EVENT_WAIT, what="the capture to start")["pcap"]
        n.check(st["trigger"] == {"annotation": CAPTURE_SPEC}, f"capture {st['id']} started")
        url = f"http://{pay.ip}:{API_PORT}/v1/charge"

        def finished() -> dict | None:
            ev = [e["pcap"] for e in sc.events("pcap") if e["pcap"]["id"] == st["id"]
                  and e["pcap"]["state"] in ("finished", "failed")]
            if ev:
                return ev[0]
            self.curl(chk, "-X", "POST", "-d", "amount=3", "-o", "/dev/null", url, show=False)
            return None

        fin = wait_until(finished, 20, interval=0.2, what="the capture to finish")
        n.check(fin["state"] == "finished" and fin.get("reason") == "max-packets",
                f"capture {fin['state']}: {fin['packets']} packets, {fin['bytes']} bytes, reason {fin.get('reason')}")
        src = Path(fin["dir"]) / fin["files"][0]
        dst = self.out / "captures" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
        n.command(["tcpdump", "-nn", "-r", str(dst)])
        r = sh(["tcpdump", "-nn", "-r", str(dst)], check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        n.check(r.returncode == 0 and len(lines) == fin["packets"] and all(".9000" in ln for ln in lines),
                f"tcpdump read {len(lines)} packets, all port 9000")
        for ln in lines[:3]:
            n.say(f"[dim]{ln[:110]}[/dim]")

    def step_quarantine(self) -> None:
        n = self.n
        assert n is not None
        pay, db, chk = self.pods["payments"], self.pods["db"], self.pods["checkout"]
        sc = self.sidecars[0]
        holder = chk.popen([PY, "-c", HOLDER, pay.ip, str(API_PORT)], stderr=subprocess.DEVNULL)
        first = holder.stdout.readline().decode().strip() if holder.stdout else ""
        n.check(first == "HTTP/1.1 200 OK", "checkout holds an open keep-alive connection to payment-api")
        self.set_annotations("payments", quarantine="true")
        n.say(f'annotation [yellow]{ANN_QUARANTINE}: "true"[/yellow] on payment-api-0')
        t0 = time.monotonic()
        ended = holder.stdout.readline().decode().strip() if holder.stdout else ""
        n.check(ended in ("reset", "closed"), f"the open connection was cut ({ended}) after "
                                              f"{time.monotonic() - t0:.1f}s")
        sc.wait_event(lambda e: e.get("event_type") == "quarantine" and e["quarantine"]["state"] == "on",
                      EVENT_WAIT, what="the quarantine event")
        url = f"http://{pay.ip}:{API_PORT}/v1/charge"
        r = self.curl(chk, "-X", "POST", "-d", "amount=4", url)
        n.check(r.returncode in (7, 52, 56), f"new connection checkout -> payment-api refused (curl exit {r.returncode})")
        cmd = ["redis-cli", "-h", db.ip, "-p", str(REDIS_PORT), "GET", "order:1000"]
        self.n.command(cmd, f"[{pay.name}]")
        r = self.run_in(pay, cmd)
        said = (r.stdout.strip() or r.stderr.strip()).splitlines()
        n.check("charged" not in r.stdout and (r.returncode != 0 or "error" in r.stdout.lower()),
                f"payment-api -> payments-db cut too ({said[0][:70] if said else 'no answer'}): "
                "the pod is cut off both ways")
        self.set_annotations("payments", quarantine=None)
        n.say(f"annotation {ANN_QUARANTINE} removed")
        sc.wait_event(lambda e: e.get("event_type") == "quarantine" and e["quarantine"]["state"] == "off",
                      EVENT_WAIT, what="the quarantine-off event")
        wait_until(lambda: self.curl(chk, "-X", "POST", "-d", "amount=5", "-o", "/dev/null", "-w", "%{http_code}",
                                     url, show=False).stdout == "200", 10, what="traffic to come back")
        n.check(True, "quarantine lifted: checkout -> payment-api answers 200 again")

    def step_segtest(self) -> None:
        n = self.n
        assert n is not None
        pay, db, ana = self.pods["payments"], self.pods["db"], self.pods["analytics"]
        plan = [{"source": "analytics", "scope": "out-of-scope", "targets": [
            {"name": "payments/payment-api", "address": pay.ip, "ports": [API_PORT, SSH_PORT], "scope": "cde"},
            {"name": "payments/payments-db", "address": db.ip, "ports": [REDIS_PORT], "scope": "cde"}]}]
        plan_path = self.out / "segtest-plan.yaml"
        plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
        self.segtest_path = self.out / "segtest-analytics.json"
        r = self.cli(["segtest", "--plan", str(plan_path), "--source", "analytics", "-o", str(self.segtest_path),
                      "--timeout", "2"], pod=ana)
        for line in r.stdout.strip().splitlines():
            n.say(f"[dim]{line}[/dim]")
        doc = json.loads(self.segtest_path.read_text()) if self.segtest_path.exists() else {}
        n.check(r.returncode == 0 and doc.get("passed") is True,
                f"segmentation test passed: {doc.get('summary', {}).get('probes')} probes from analytics, "
                f"{doc.get('summary', {}).get('refused')} refused, 0 reachable")

    def step_report(self) -> None:
        n = self.n
        assert n is not None
        self.save_artifacts()
        events = [str(p) for p in sorted((self.out / "events").glob("protect-*.eve.json"))]
        rep = self.out / "report"
        argv = ["report", "--policy", *sorted(str(p) for p in self.policy_dir.glob("*.yaml")),
                "--events", *events, "--identity", str(self.out / "identity.yaml"),
                "--segtest", str(self.segtest_path), "-o", str(rep), "--jobs", "1"]
        if not self.args.pdf:
            argv.append("--no-pdf")
        r = self.cli(argv, timeout=90)
        for line in r.stdout.strip().splitlines():
            n.say(f"[dim]{line}[/dim]")
        html = rep / "report.html"
        n.check(r.returncode == 0 and html.exists() and (rep / "report.json").exists(),
                "report.html and report.json written" + ("" if r.returncode == 0 else f": {r.stderr.strip()}"))
        text = html.read_text(errors="replace") + (rep / "report.json").read_text(errors="replace")
        n.check(TEST_PAN not in text and TEST_PAN_MASKED in text,
                f"the DLP finding is in the report, masked ({TEST_PAN_MASKED})")
        self.report_path = html
        code, body = self.sidecars[0].admin_get("/metrics")
        for m in re.finditer(r"^(palisade_(?:connections_total|dlp_findings_total|alerts_total)\{[^}]*\}) (\S+)$",
                             body, re.M):
            self.metrics[m.group(1)] = float(m.group(2))
        n.check(code == 200 and any("verdict=\"deny\"" in k for k in self.metrics),
                f"/metrics on :{ADMIN_PORT} counts the denies and DLP findings ({len(self.metrics)} series)")

    STEPS: list[tuple[str, str, str]] = [
        ("step_cluster", "A small cluster of network namespaces",
         "Four pods on one bridge: the payment API and its Redis database are in the cardholder-data "
         "environment (CDE), checkout is connected to it, analytics is out of scope. Real servers: nginx "
         "(or Python's http.server when nginx is missing), sshd, redis-server and an HTTP collector."),
        ("step_learn", "Learn mode: record the traffic, export a policy",
         "The init container installs the nftables steering rules, the sidecar starts in learn mode and every "
         "connection becomes a flow record. `policy learn` turns the records into one FirewallPolicy per "
         "workload; the application team reviews it and adds the platform's guard rails."),
        ("step_protect", "Protect mode: segmentation and least privilege",
         "The same pods restart with the reviewed policy. Checkout may charge; anything that was never seen is "
         "refused; an out-of-scope pod never reaches the CDE; SSH is denied by the cluster baseline."),
        ("step_dlp", "DLP: a card number in clear text leaving the CDE",
         "The payment API posts an order with a card number to the analytics collector. The flow itself is "
         "allowed, the content is not: Hyperscan finds the number in the stream before it is forwarded."),
        ("step_capture", "An annotation starts a packet capture",
         "An SRE annotates the pod; the sidecar captures exactly the bounded slice asked for into a pcap "
         "file that tcpdump, tshark and Wireshark read."),
        ("step_quarantine", "Quarantine cuts a pod off",
         "One annotation denies every new flow in and out of the pod and cuts the open ones; removing it "
         "restores service."),
        ("step_segtest", "Segmentation test (PCI DSS 11.4.5)",
         "From the out-of-scope namespace, try every CDE port and record what happens: the proof that "
         "segmentation works, not just that it is configured."),
        ("step_report", "The auditor's evidence pack",
         "Policies, flow records, DLP findings (masked) and the segmentation test, in one self-contained "
         "HTML page and its JSON."),
    ]
