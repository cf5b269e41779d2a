"""One-off rewrite for the firewall/ package split (issue 18, requirement 3).

Moves each flat module with ``git mv`` and rewrites every reference: dotted module paths
(imports, monkeypatch targets, ``python -m``), ``from firewall import mod`` lines and
``firewall/mod.py`` file paths.  Kept in the repository so the mapping is on record.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

MAP = {
    "run_cli": "sidecar.app", "config": "sidecar.config", "privileges": "sidecar.privileges",
    "redirect": "datapath.redirect", "proxy": "datapath.proxy", "splice": "datapath.splice",
    "dnsrelay": "datapath.dnsrelay", "session": "datapath.session",
    "exception_policy": "datapath.exception_policy", "l3rules": "datapath.l3rules",
    "nflog": "datapath.nflog",
    "httpdecode": "protocols.httpdecode", "http_canon": "protocols.http_canon",
    "policy_model": "policy.model", "policy_schema": "policy.schema", "policy_yaml": "policy.yaml",
    "policy_loader": "policy.loader", "policy_match": "policy.match", "policy": "policy.engine",
    "policy_explain": "policy.explain", "learn": "policy.learn", "policy_cli": "policy.cli",
    "identity": "identity.identity", "fqdn": "identity.fqdn", "podinfo": "identity.podinfo",
    "dlp": "dlp.engine", "dlp_rules": "dlp.rules", "dlp_validators": "dlp.validators",
    "dlp_mask": "dlp.mask", "dlp_cli": "dlp.cli",
    "events": "observe.events", "metrics": "observe.metrics", "alertsink": "observe.alertsink",
    "redaction": "observe.redaction", "signature": "observe.signature",
    "capture": "capture.manager", "capture_cli": "capture.cli",
    "report": "audit.report", "report_data": "audit.report_data", "report_html": "audit.report_html",
    "report_svg": "audit.report_svg", "report_cli": "audit.cli", "segtest": "audit.segtest",
    "docs_gen": "audit.docs_gen",
    "demo": "lab.demo", "demo_runtime": "lab.demo_runtime",
}
_names = "|".join(sorted(MAP, key=len, reverse=True))
DOTTED = re.compile(rf"(?<![\w.])firewall\.({_names})(?!\w)")
PATH = re.compile(rf"(?<![\w/])firewall/({_names})\.py(?!\w)")
FROM = re.compile(r"^(\s*)from firewall import ([\w ,]+?)\s*(#.*)?$", re.M)


def _from_line(m: re.Match) -> str:
    indent, names = m.group(1), [n.strip() for n in m.group(2).split(",") if n.strip()]
    keep, lines = [], []
    for item in names:
        name, _, alias = (p.strip() for p in item.partition(" as "))
        if name not in MAP:
            keep.append(item)
            continue
        pkg, _, mod = MAP[name].rpartition(".")
        local = alias or name
        lines.append(f"{indent}from firewall.{pkg} import {mod}" + ("" if local == mod else f" as {local}"))
    if keep:
        lines.insert(0, f"{indent}from firewall import {', '.join(keep)}")
    return "\n".join(lines) + (f"  {m.group(3)}" if m.group(3) and len(lines) == 1 else "")


def rewrite(text: str) -> str:
    # dotted paths first: the ``from firewall.<pkg> import <mod>`` lines FROM writes must not be
    # rewritten again (``firewall.policy`` is both an old module and a new package)
    text = DOTTED.sub(lambda m: "firewall." + MAP[m.group(1)], text)
    text = FROM.sub(_from_line, text)
    return PATH.sub(lambda m: "firewall/" + MAP[m.group(1)].replace(".", "/") + ".py", text)


def main() -> int:
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    if "--move" in sys.argv:
        for old, new in MAP.items():
            dst = root / "firewall" / (new.replace(".", "/") + ".py")
            dst.parent.mkdir(exist_ok=True)
            init = dst.parent / "__init__.py"
            if not init.exists():
                init.write_text("")
            subprocess.check_call(["git", "mv", f"firewall/{old}.py", str(dst.relative_to(root))], cwd=root)
    for rel in subprocess.check_output(["git", "ls-files"], cwd=root, text=True).split():
        path = root / rel
        if rel == "scripts/relayout.py" or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            print("rewrote", rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
