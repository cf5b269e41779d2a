from __future__ import annotations

import subprocess
import sys

import pytest

from firewall.sidecar.config import ConfigError, load_config


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.inbound_port == 15006 and cfg.outbound_port == 15001 and cfg.admin_port == 15020


def test_file_values_and_dashes(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("idle-timeout: 30\nmode: monitor\npolicy: /etc/p\n")
    cfg = load_config(str(p))
    assert cfg.idle_timeout == 30.0 and cfg.mode == "monitor" and cfg.policy == ["/etc/p"]


@pytest.mark.parametrize("text,needle", [
    ("idle_timout: 3\n", "idle_timout: unknown key"),
    ("mode: enforce\n", "mode: expected one of learn, monitor, protect"),
    ("inbound_port: 70000\n", "inbound_port: expected a port"),
    ("workers: two\n", "workers: expected an integer"),
    ("- a\n", "expected a mapping"),
    ("a: [\n", "invalid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(str(p))


def test_run_with_bad_config_exits_2_with_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mode: enforce\n")
    r = subprocess.run([sys.executable, "-m", "firewall", "run", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "mode" in r.stderr and "Traceback" not in r.stderr


def test_run_with_bad_policy_exits_1_with_location(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("apiVersion: palisade.dev/v1\nkind: FirewallPolicy\nmetadata: {name: x}\nspec:\n  selectr: {}\n")
    r = subprocess.run([sys.executable, "-m", "firewall", "run", "--policy", str(p), "--no-drop-privileges",
                        "--inbound-port", "0", "--outbound-port", "0", "--dns-port", "0", "--admin-port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "p.yaml:5" in r.stderr and "Traceback" not in r.stderr
