"""An absent optional ConfigMap is an empty directory in the pod: it means "not configured".

Issue 19: with the injector's ``--policy /etc/palisade/policy --dlp-rules /etc/palisade/dlp`` and
neither ConfigMap in the namespace, the sidecar exited (no DLP rule packs) and would have run an
empty policy set in protect mode. tests/runtime proves it in containers; this is the fast check.
"""

from __future__ import annotations

from firewall.observe.events import EventSink
from firewall.sidecar.app import Sidecar, _with_yaml
from firewall.sidecar.config import Config


def _sidecar(tmp_path, policy_files: dict[str, str], dlp_files: dict[str, str]) -> Sidecar:
    pol, dlp = tmp_path / "policy", tmp_path / "dlp"
    for d, files in ((pol, policy_files), (dlp, dlp_files)):
        d.mkdir()
        for name, text in files.items():
            (d / name).write_text(text)
    cfg = Config()
    cfg.policy, cfg.dlp_rules, cfg.dlp_cache = [str(pol)], [str(dlp)], str(tmp_path / "cache")
    return Sidecar(cfg, EventSink(path=str(tmp_path / "eve.json")))


def test_empty_configmap_dirs_mean_learn_mode_and_builtin_packs(tmp_path):
    # a ConfigMap volume's bookkeeping entries are not policies
    sc = _sidecar(tmp_path, {"..data": "x", "README": "not yaml"}, {})
    policy = sc.load_policy()
    assert policy.is_empty
    dlp = sc.load_dlp()
    assert dlp is not None and "payment_cards" in {p for p in dlp.enabled}


def test_a_policy_file_in_the_directory_is_loaded(tmp_path):
    text = ("apiVersion: palisade.dev/v1\nkind: ClusterFirewallPolicy\nmetadata: {name: b}\n"
            "spec:\n  rules:\n    - {name: no-ssh, direction: ingress, appProto: ssh, action: deny}\n")
    sc = _sidecar(tmp_path, {"b.yaml": text}, {})
    assert not sc.load_policy().is_empty


def test_with_yaml_keeps_files_and_directories_with_yaml(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.yml").write_text("")
    (tmp_path / "f.yaml").write_text("")
    assert _with_yaml([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "f.yaml")]) == [
        str(tmp_path / "b"), str(tmp_path / "f.yaml")]
