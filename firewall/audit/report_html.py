"""report.html: one self-contained page for an auditor who does not know Kubernetes.

Everything is inline (CSS, SVG); the page loads nothing, runs no script and
can be mailed or archived as is.  Every value is HTML-escaped and comes from
the report dict, which has already been PAN-scrubbed.  Long tables are capped
(the full lists are in report.json) so a week of events still gives a page a
browser can print.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable
from typing import Any

from firewall.audit.report_svg import ALLOW_COLOR, DENY_COLOR, MONITOR_COLOR, render_diagram

MAX_ROWS = 300

CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;font-size:13px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:28px}
.req{font-weight:normal;color:#666;font-size:12px}
table{border-collapse:collapse;width:100%;margin:8px 0} th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f2f4f6} tr.flag td{background:#fff3cd} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0} .card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;min-width:140px}
.card b{display:block;font-size:20px} .ok{color:#1e6f3d} .bad{color:#c0392b} .warn{color:#b9770e}
.sev-high{color:#c0392b;font-weight:bold} .sev-medium{color:#b9770e;font-weight:bold} .sev-info{color:#2c3e50}
.scope{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px}
.scope-cde{background:#fde2e1} .scope-connected{background:#fff4d6} .scope-out-of-scope{background:#eef1f4}
.diagram{overflow:auto;border:1px solid #ddd;padding:6px} .diagram svg{max-width:100%;height:auto}
.muted{color:#666} code{font-size:12px;word-break:break-all}
@media print{body{margin:0;max-width:none} h2{page-break-after:avoid} tr{page-break-inside:avoid}}
"""


def e(value: Any) -> str:
    if value is None:
        return ""
    return html.escape(str(value), quote=True)


def scope_tag(scope: str) -> str:
    return f'<span class="scope scope-{e(scope)}">{e(scope)}</span>'


def table(headers: list[str], rows: Iterable[list[str]], flags: Iterable[bool] | None = None,
          total: int | None = None, empty: str = "none") -> str:
    """Cells are pre-escaped HTML; numeric columns are marked by a header ending in '#'."""
    rows = list(rows)
    flags_l = list(flags) if flags is not None else [False] * len(rows)
    if not rows:
        return f'<p class="muted">{e(empty)}</p>'
    num = [h.endswith("#") for h in headers]
    out = ["<table><thead><tr>"]
    out += [f"<th>{e(h.rstrip('#'))}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for row, flag in zip(rows[:MAX_ROWS], flags_l[:MAX_ROWS], strict=False):
        cls = ' class="flag"' if flag else ""
        cells = "".join(f'<td class="num">{c}</td>' if num[i] else f"<td>{c}</td>" for i, c in enumerate(row))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    n = total if total is not None else len(rows)
    if n > MAX_ROWS:
        out.append(f'<p class="muted">{n - MAX_ROWS} more rows in report.json</p>')
    return "".join(out)


def section(title: str, req: str, body: str, anchor: str) -> str:
    return f'<h2 id="{anchor}">{e(title)} <span class="req">PCI DSS {e(req)}</span></h2>\n{body}\n'


def _card(title: str, value: Any, cls: str = "") -> str:
    return f'<div class="card"><b class="{cls}">{e(value)}</b>{e(title)}</div>'


def _summary(rep: dict[str, Any]) -> str:
    inv = rep["inventory"]["scopes"]
    cde = inv.get("cde", {"workloads": 0, "pods": 0})
    into = rep["encryption"]["into_cde"]
    denied = sum(d["count"] for d in rep["denied_into_cde"])
    seg = rep["segtest"]
    seg_text, seg_cls = ("not run", "warn") if seg is None else (("PASSED", "ok") if seg["passed"] else ("FAILED", "bad"))
    review = rep["review"]
    cards = [
        _card("CDE workloads", f"{cde['workloads']} ({cde['pods']} pods)"),
        _card("flows into the CDE", into["flows"]),
        _card("denied attempts into the CDE", denied, "bad" if denied else "ok"),
        _card("DLP findings (masked)", rep["dlp_summary"]["total"], "bad" if rep["dlp_summary"]["total"] else "ok"),
        _card("segmentation test", seg_text, seg_cls),
        _card("rule review", "overdue" if review["flagged"] else "current", "bad" if review["flagged"] else "ok"),
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def _findings(rep: dict[str, Any]) -> str:
    rows = [[f'<span class="sev-{e(f["severity"])}">{e(f["severity"])}</span>', e(f["requirement"]),
             e(f["message"])] for f in rep["findings"]]
    return table(["severity", "requirement", "finding"], rows, empty="nothing to report")


def _inventory(rep: dict[str, Any]) -> str:
    inv = rep["inventory"]
    rows = [[scope_tag(s), e(v["workloads"]), e(v["pods"]), e(", ".join(v["namespaces"]))]
            for s, v in inv["scopes"].items()]
    out = ["<p>Workloads grouped by their <code>pci.palisade.dev/scope</code> label "
           "(unlabelled workloads are out of scope).</p>",
           table(["scope", "workloads#", "pods#", "namespaces"], rows)]
    out.append("<h3>Namespaces</h3>")
    out.append(table(["namespace", "workloads by scope"],
                     [[e(n["name"]), ", ".join(f"{scope_tag(k)} {e(v)}" for k, v in n["workloads_by_scope"].items())]
                      for n in inv["namespaces"]]))
    out.append("<h3>Workloads</h3>")
    wl = inv["workloads"]
    out.append(table(
        ["scope", "namespace", "workload", "pods#", "pod names", "seen in"],
        [[scope_tag(w["scope"]) + ("" if len(w["scopes_seen"]) < 2 else " (also " + e(", ".join(w["scopes_seen"])) + ")"),
          e(w["namespace"]), e(w["name"]), e(w["pod_count"]), e(", ".join(w["pods"][:6])
                                                                + (" ..." if len(w["pods"]) > 6 else "")),
          e(", ".join(w["source"]))] for w in wl],
        flags=[len(w["scopes_seen"]) > 1 for w in wl]))
    out.append(f'<p class="muted">{e(inv["external_addresses"])} addresses outside the cluster appear in the events.</p>')
    return "".join(out)


def _diagram(rep: dict[str, Any]) -> str:
    svg, engine, note = render_diagram(rep)
    legend = (f'<p><span style="color:{ALLOW_COLOR}">&#8594; solid green: allowed flow (port/protocol, count)</span> &nbsp; '
              f'<span style="color:{DENY_COLOR}">&#8674; dashed red: denied attempt</span> &nbsp; '
              f'<span style="color:{MONITOR_COLOR}">&#8674; dashed orange: would be denied (monitor/learn mode, '
              f"not blocked)</span></p>")
    extra = f'<p class="muted">{e(note)}</p>' if note else ""
    return (legend + extra + f'<div class="diagram">{svg}</div>'
            + f'<p class="muted">Drawn by {e(engine)} from the flows in the event window.</p>')


def _rule_rows(rules: list[dict[str, Any]]) -> tuple[list[list[str]], list[bool]]:
    rows, flags = [], []
    for r in rules:
        l7 = "; ".join(f"{k}: {json.dumps(v, separators=(',', ':'))}" for k, v in r["l7"].items())
        proto = " ".join(x for x in [e(r["app_proto"] or ""), e(l7)] if x)
        if r["packs"]:
            proto = (proto + " packs: " + e(", ".join(r["packs"]))).strip()
        rows.append([
            e(r["kind"].replace("FirewallPolicy", "Policy")) + "<br>" + e(r["policy"])
            + (f"<br><span class='muted'>{e(r['namespace'])}</span>" if r["namespace"] else ""),
            f"<b>{e(r['name'])}</b>", e(r["direction"]), "<br>".join(e(p) for p in r["peers_text"]),
            e(", ".join(r["ports"]) or "any"), proto, e(r["action"]),
            e(r["description"]) or ('<span class="warn">missing</span>' if r["action"] == "allow" else ""),
            e(r["hits"]), e(f"{r['allowed']} / {r['denied']}"), e(r["last_hit"] or "never"),
            "<br>".join(e(f) for f in r["review_flags"]),
        ])
        flags.append(bool(r["never_hit"]))
    return rows, flags


RULE_HEADERS = ["policy", "rule", "direction", "peers", "ports", "app_proto / L7", "action",
                "business justification", "hits#", "allowed / denied", "last hit", "review"]


def _rules(rep: dict[str, Any]) -> str:
    cde = [r for r in rep["rules"] if r["touches_cde"]]
    other = [r for r in rep["rules"] if not r["touches_cde"]]
    rows, flags = _rule_rows(cde)
    out = ["<p>Every rule that applies to a CDE workload or names a CDE peer. Highlighted rows were never hit "
           "in the event window and should be reviewed (remove what is not needed).</p>",
           table(RULE_HEADERS, rows, flags, empty="no rule touches the CDE")]
    if cde:
        out.append("<details><summary>Why each rule is in CDE scope</summary><ul>")
        out += [f"<li><b>{e(r['id'])}</b>: {e('; '.join(r['cde_reasons']))}</li>" for r in cde]
        out.append("</ul></details>")
    if other:
        rows, flags = _rule_rows(other)
        out.append("<h3>Other rules</h3>")
        out.append(table(RULE_HEADERS, rows, flags))
    pol = rep["policies"]
    out.append("<h3>Policies</h3>")
    out.append(table(["kind", "name", "namespace", "mode", "default", "last reviewed", "review due", "status"],
                     [[e(p["kind"]), e(p["name"]), e(p["namespace"] or "(cluster)"), e(p["mode"]), e(p["default"]),
                       e(p["last_reviewed"] or "missing"), e(p["review_due"]),
                       f'<span class="{"bad" if p["review_flagged"] else "ok"}">{e(p["review_status"])}</span>']
                      for p in pol], [p["review_flagged"] for p in pol]))
    if rep["unmatched_rules_in_events"]:
        out.append("<h3>Built-in decisions and rule names not in these policy files</h3>")
        out.append(table(["rule", "meaning", "count#", "last"],
                         [[e(u["rule"]), e(u["meaning"]), e(u["count"]), e(u["last"])]
                          for u in rep["unmatched_rules_in_events"]],
                         [not u["builtin"] for u in rep["unmatched_rules_in_events"]]))
    return "".join(out)


def _who(d: dict[str, Any]) -> str:
    s = e(d["src"]) + " " + scope_tag(d["src_scope"])
    if d.get("src_samples"):
        s += "<br><span class='muted'>" + e(", ".join(d["src_samples"])) + "</span>"
    return s


def _denied(rows: list[dict[str, Any]], empty: str) -> str:
    return table(["from (who)", "to", "port", "app_proto", "rule", "blocked", "attempts#", "first", "last"],
                 [[_who(d), e(d["dst"]) + " " + scope_tag(d["dst_scope"]), e(f"{d['port']}/{d['proto']}"),
                   e(d["app_proto"]), e(d["rule"]),
                   "yes" if d["enforced"] else f'<span class="bad">no ({e(d["mode"])})</span>',
                   e(d["count"]), e(d["first"]), e(d["last"])] for d in rows],
                 [not d["enforced"] for d in rows], empty=empty)


def _segtest(rep: dict[str, Any]) -> str:
    seg = rep["segtest"]
    if seg is None:
        return ('<p class="warn">No segmentation test results were supplied. Run '
                "<code>python -m firewall segtest --plan plan.yaml -o results.json</code> from every "
                "out-of-scope namespace and pass the results with <code>--segtest</code>.</p>")
    verdict = ('<p class="ok"><b>PASSED</b>: no out-of-scope source reached a CDE target.</p>' if seg["passed"]
               else f'<p class="bad"><b>FAILED</b>: {len(seg["violations"])} probes from out-of-scope sources '
                    "reached the CDE.</p>")
    runs = table(["results file", "plan sha256", "started", "finished", "passed"],
                 [[e(r["path"]), f"<code>{e(r['plan_sha256'])}</code>", e(r["started"]), e(r["finished"]),
                   "yes" if r["passed"] else '<span class="bad">no</span>'] for r in seg["runs"]])
    due = f'<p>Next test due by {e(seg["next_due"])} (at least every 12 months and after changes).</p>' \
        if seg["next_due"] else ""
    counts = ", ".join(f"{e(k)}: {e(v)}" for k, v in sorted(seg["results"].items()))
    per_proto: dict[str, dict[str, int]] = {}
    for p in seg["probes"]:  # outcome per protocol: TCP, UDP, ICMP
        d = per_proto.setdefault(str(p.get("proto") or "TCP"), {})
        d[str(p.get("result"))] = d.get(str(p.get("result")), 0) + 1
    counts += "".join(f"; {e(k)}: " + ", ".join(f"{e(r)} {n}" for r, n in sorted(v.items()))
                      for k, v in sorted(per_proto.items()))
    probes = sorted(seg["probes"], key=lambda p: (not p.get("violation"), str(p.get("source")), str(p.get("target"))))
    rows = [[e(p.get("source")) + " " + scope_tag(str(p.get("source_scope", ""))),
             e(p.get("target")) + " " + scope_tag(str(p.get("target_scope", ""))),
             e(f"{p.get('address')}/ICMP" if p.get("proto") == "ICMP" else
               f"{p.get('address')}:{p.get('port')}/{p.get('proto')}"),
             f'<b class="{"bad" if p.get("violation") else ""}">{e(p.get("result"))}</b>',
             e(p.get("detail", "")), e(p.get("rtt_ms")), e(p.get("timestamp"))] for p in probes]
    return (verdict + due + runs + f"<p>Results: {counts}</p>"
            + table(["source", "target", "address", "result", "detail", "rtt ms#", "time"], rows,
                    [bool(p.get("violation")) for p in probes]))


def _dlp(rep: dict[str, Any]) -> str:
    s = rep["dlp_summary"]
    by = table(["rule", "by direction"], [[e(r), e(", ".join(f"{k}: {v}" for k, v in d.items()))]
                                          for r, d in s["by_rule_and_direction"].items()], empty="no DLP findings")
    rows = [[e(f["rule"]), e(f["detector"]), e(f["type"]), e(f["direction"] or f["flow_direction"]),
             e(f["action"]), e(f["src"]) + " " + scope_tag(f["src_scope"]), e(f["dst"]) + " " + scope_tag(f["dst_scope"]),
             e(f["count"]), "<br>".join(f"<code>{e(x)}</code>" for x in f["samples"]), e(f["last"])]
            for f in rep["dlp_findings"]]
    return ("<p>Sensitive data seen on the wire. Values are masked (cards: first 6 / last 4).</p>" + by
            + table(["rule", "detector", "type", "direction", "action", "from", "to", "count#", "masked samples",
                     "last"], rows, empty="no DLP findings"))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _encryption(rep: dict[str, Any]) -> str:
    rows = []
    for key, title in (("into_cde", "into the CDE"), ("out_of_cde", "out of the CDE"), ("within_cde", "within the CDE")):
        b = rep["encryption"][key]
        rows.append([e(title), e(b["flows"]), e(b["encrypted_flows"]), e(b["plaintext_flows"]),
                     e(_pct(b["encrypted_share_flows"])), e(b["bytes"]), e(_pct(b["encrypted_share_bytes"]))])
    return ("<p>Flows the sidecar saw as TLS (or another encrypted protocol) versus plaintext.</p>"
            + table(["traffic", "flows#", "encrypted#", "plaintext#", "encrypted share#", "bytes#",
                     "encrypted bytes share#"], rows))


def _evidence(rep: dict[str, Any]) -> str:
    tr = rep["time_range"]
    inputs = rep["inputs"]
    files = table(["policy file", "sha256", "resources#"],
                  [[e(f["path"]), f"<code>{e(f['sha256'])}</code>", e(f["resources"])] for f in inputs["policies"]])
    ev = table(["events file", "bytes#"], [[e(f["path"]), e(f["bytes"])] for f in inputs["events"]],
               empty="no event files")
    ident = inputs["identity"]
    ident_html = (f"<p>Identity file {e(ident['path'])} (<code>{e(ident['sha256'])}</code>, "
                  f"{e(ident['entries'])} entries).</p>") if ident else ""
    types = ", ".join(f"{e(k)}: {e(v)}" for k, v in tr["by_type"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in rep["notes"])
    return (f"<p>Events cover <b>{e(tr['start'] or 'n/a')}</b> to <b>{e(tr['end'] or 'n/a')}</b>: "
            f"{e(tr['events'])} events from {e(tr['lines'])} lines ({e(tr['bad_lines'])} unreadable). "
            f"By type: {types or 'none'}.</p>" + _dropped(rep) + files + ev + ident_html
            + _captures(rep) + _unenforced(rep)
            + (f"<ul>{notes}</ul>" if notes else ""))


def _dropped(rep: dict[str, Any]) -> str:
    d = rep["evidence"]["events_dropped"]
    if not d["events"] and not d["alerts"]:
        return ("<p>Dropped events: <b>0</b> reported (no <code>events dropped</code> evidence alert in the "
                "input; the sidecars count losses in <code>palisade_events_dropped_total</code>).</p>")
    return (f'<p class="bad">Dropped events: <b>{e(d["events"])}</b> events could not be written by the '
            f'sidecars ({e(", ".join(d["reasons"]) or "reason not given")}; {e(d["alerts"])} evidence alerts): '
            "the events above are incomplete.</p>")


def _captures(rep: dict[str, Any]) -> str:
    c = rep["evidence"]["capture_files"]
    r = c["retention"]
    head = (f"<h3>Packet captures: cardholder-data artefacts</h3><p><b>{e(c['count'])}</b> capture file(s), "
            f"<b>{e(c['bytes'])}</b> bytes, in {e(', '.join(c['dirs']) or 'no pcap directory')}. "
            f"{e(c['note'])}. Retention: {e(r['policy'])}"
            + (f" (disk budget {e(r['disk_budget_bytes'])} bytes)" if r["disk_budget_bytes"] else "")
            + f"; oldest {e(r['oldest'] or 'n/a')}, newest {e(r['newest'] or 'n/a')}; "
            f"{e(c['removed_by_budget'])} removed by the budget, {e(c['captures_failed'])} failed.</p>")
    return head + table(["file", "capture", "bytes#", "sha256", "written"],
                        [[e(f["file"]), e(f["capture"]), e(f["bytes"]), f"<code>{e(f['sha256'])}</code>",
                          e(f["written"])] for f in c["files"]],
                        total=len(c["files"]) + c["files_not_listed"], empty="no capture files retained")


def _unenforced(rep: dict[str, Any]) -> str:
    pods = rep["evidence"]["unenforced_cde_pods"]
    return ("<h3>CDE pods that ran in learn or monitor mode (not enforced)</h3>"
            + table(["pod", "mode", "from", "to", "seconds#", "flows#"],
                    [[e(f"{p['namespace']}/{p['pod']}"), e(p["mode"]), e(p["first"]), e(p["last"]),
                      e(p["seconds"]), e(p["flows"])] for p in pods],
                    [True] * len(pods), total=len(pods) + rep["evidence"]["unenforced_cde_pods_not_listed"],
                    empty="none: every CDE flow was decided in protect mode"))


def _flows_appendix(rep: dict[str, Any]) -> str:
    rows = [f for f in rep["flows"] if f["src_scope"] == "cde" or f["dst_scope"] == "cde"]
    return table(["from", "to", "port", "app_proto", "verdict", "rule", "flows#", "bytes#", "encrypted#", "last"],
                 [[e(f["src"]) + " " + scope_tag(f["src_scope"]), e(f["dst"]) + " " + scope_tag(f["dst_scope"]),
                   e(f"{f['port']}/{f['proto']}"), e(f["app_proto"]), e(f["verdict"]), e(f["rule"]),
                   e(f["count"]), e(f["bytes"]), e(f["encrypted_flows"]), e(f["last"])] for f in rows],
                 [f["verdict"] != "allow" for f in rows], empty="no flows touch the CDE")


SECTIONS: list[tuple[str, str, str, Callable[[dict[str, Any]], str]]] = [
    ("findings", "Findings", "summary", _findings),
    ("inventory", "Scope inventory", "1.2.4, 12.5.2", _inventory),
    ("diagram", "Data-flow diagram", "1.2.3, 1.2.4", _diagram),
    ("rules", "Rules that touch the CDE", "1.2.5, 1.2.7, 1.3.1, 1.3.2", _rules),
    ("denied", "Denied attempts into the CDE", "1.3.1, 1.4.2",
     lambda r: _denied(r["denied_into_cde"], "no denied attempts into the CDE")),
    ("denied-out", "Denied attempts out of the CDE", "1.3.2",
     lambda r: _denied(r["denied_out_of_cde"], "no denied attempts out of the CDE")),
    ("segtest", "Segmentation test", "11.4.5", _segtest),
    ("dlp", "DLP findings (masked)", "3.4.1, 3.3", _dlp),
    ("encryption", "Encrypted vs. plaintext traffic", "4.2.1", _encryption),
    ("evidence", "Evidence integrity: inputs and time range", "10.3, 1.2.7", _evidence),
    ("flows", "Appendix: all flows touching the CDE", "1.2.4", _flows_appendix),
]


def render_html(rep: dict[str, Any]) -> str:
    tr = rep["time_range"]
    toc = " &middot; ".join(f'<a href="#{a}">{e(t)}</a>' for a, t, _, _ in SECTIONS)
    body = "".join(section(t, req, fn(rep), a) for a, t, req, fn in SECTIONS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">"
        "<title>Palisade segmentation report</title>"
        f"<style>{CSS}</style></head><body>\n"
        "<h1>Palisade segmentation and data-flow report</h1>"
        f'<p class="muted">Generated {e(rep["generated_at"])} by {e(rep["generator"])} &middot; assessed as of '
        f'{e(rep["as_of"])} &middot; events {e(tr["start"] or "n/a")} to {e(tr["end"] or "n/a")}</p>'
        f"{_summary(rep)}<p>{toc}</p>\n{body}"
        '<p class="muted">Machine-readable facts: report.json (schema palisade.dev/report/v1, see docs/auditor.md).</p>'
        "</body></html>\n"
    )
