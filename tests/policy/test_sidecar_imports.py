"""The running sidecar never imports pydantic (issue 9: idle RSS; pydantic + the policy models'
validators were ~10 MiB of every sidecar).  Since the JSON Schema is generated from the model's
own field tables, nothing in the project needs pydantic any more."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.policy.common import ROOT

STARTUP = textwrap.dedent("""
    import os, sys
    from firewall.sidecar import app as run_cli
    from firewall.cli import build_parser

    args = build_parser().parse_args(sys.argv[1:])
    cfg = run_cli._apply_flags(run_cli.load_config(args.config), args)
    side = run_cli.Sidecar(cfg, run_cli.EventSink(stream=open(os.devnull, "w")), {"app": "bench-server"})
    side.startup()          # what `python -m firewall run` does before binding: imports, policy, DLP
    side.policy_digest = ""
    side.reload()           # and what a policy reload does
    assert side.policy.rule_count >= 100, side.policy.rule_count
    side.build_inspection()
    bad = sorted(m for m in sys.modules if m == "pydantic" or m.startswith(("pydantic.", "pydantic_core")))
    print("IMPORTED", bad)
""")


def test_sidecar_startup_and_reload_do_not_import_pydantic(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", STARTUP, "run", "--policy", str(ROOT / "benchmarks" / "policy100.yaml"),
         "--dlp-cache", str(tmp_path / "dlp"),
         "--events", str(tmp_path / "eve.json")],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IMPORTED []" in r.stdout, r.stdout


def test_policy_schema_does_not_need_pydantic() -> None:
    r = subprocess.run([sys.executable, "-c", "import sys\nfrom firewall.policy.schema import json_schema\n"
                        "json_schema()\nprint(sorted(m for m in sys.modules if m.startswith('pydantic')))"],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
