"""``python -m injector``: help, exit codes, one-line errors, offline mutate, certs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml
from cryptography import x509

from tests.injector.conftest import REPO
from tests.injector.test_golden import TESTDATA, make_review


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "injector", *args], input=stdin, capture_output=True,
                          cwd=REPO, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert fragment in err


def test_help_explains_every_subcommand_with_examples():
    out = run("--help").stdout.decode()
    for cmd in ("serve", "mutate", "validate", "certs", "manifests"):
        assert cmd in out
        assert f"python -m injector {cmd}" in out
        sub = run(cmd, "--help")
        assert sub.returncode == 0
        assert "example" in sub.stdout.decode()


def test_no_command_prints_help_and_exits_2():
    proc = run()
    assert proc.returncode == 2 and "usage:" in proc.stdout.decode()


@pytest.mark.parametrize("stdin, fragment", [
    (b"", "empty body"),
    (b"{oops", "not valid JSON"),
    (b'{"apiVersion": "v1", "kind": "Pod"}', "apiVersion must be admission.k8s.io/v1"),
    (b'"just a string"', "expected a JSON object"),
])
def test_mutate_bad_input_exits_2_with_one_line(stdin, fragment):
    assert_one_line_error(run("mutate", stdin=stdin), 2, fragment)


def test_mutate_bad_config_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("nativeSideCar: false\n")
    review = json.dumps(make_review({"metadata": {"name": "p", "namespace": "x"}, "spec": {}})).encode()
    assert_one_line_error(run("mutate", "--config", str(cfg), stdin=review), 2, "nativeSideCar: unknown key")


def test_mutate_print_pod_matches_golden():
    proc = run("mutate", "--pod", str(TESTDATA / "job" / "input.yaml"), "--print-pod")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == yaml.safe_load((TESTDATA / "job" / "expected.yaml").read_text())


def test_mutate_print_pod_rejection_exits_1():
    proc = run("mutate", "--pod", str(TESTDATA / "bad-exclusion-cidr" / "input.yaml"), "--print-pod")
    assert_one_line_error(proc, 1, "did you mean 10.0.0.0/8")


def test_mutate_pod_not_a_pod_exits_2(tmp_path):
    f = tmp_path / "svc.yaml"
    f.write_text("kind: Service\n")
    assert_one_line_error(run("mutate", "--pod", str(f)), 2, "expected a Pod manifest")


def test_validate_offline():
    pod = yaml.safe_load((TESTDATA / "deployment-pod" / "input.yaml").read_text())
    proc = run("validate", stdin=json.dumps(make_review(pod)).encode())
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["response"]["allowed"] is False


def test_certs_writes_a_valid_chain_and_reuses_the_ca(tmp_path):
    out = tmp_path / "certs"
    proc = run("certs", "--service", "hook", "--namespace", "sec", "-o", str(out), "--ip", "127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    for name, mode in (("ca.key", 0o600), ("tls.key", 0o600), ("ca.crt", 0o644), ("tls.crt", 0o644)):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["hook", "hook.sec", "hook.sec.svc", "hook.sec.svc.cluster.local"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    ca_before, tls_before = (out / "ca.crt").read_bytes(), (out / "tls.crt").read_bytes()
    assert run("certs", "--service", "hook", "--namespace", "sec", "-o", str(out)).returncode == 0
    assert (out / "ca.crt").read_bytes() == ca_before          # rotation keeps the caBundle valid
    assert (out / "tls.crt").read_bytes() != tls_before
    x509.load_pem_x509_certificate((out / "tls.crt").read_bytes()).verify_directly_issued_by(ca)
    assert run("certs", "-o", str(out), "--new-ca").returncode == 0
    assert (out / "ca.crt").read_bytes() != ca_before


def test_certs_bad_ip_and_broken_ca(tmp_path):
    proc = run("certs", "-o", str(tmp_path), "--ip", "not-an-ip")
    assert proc.returncode == 2 and "not an IP address" in proc.stderr.decode()
    (tmp_path / "ca.crt").write_text("garbage")
    (tmp_path / "ca.key").write_text("garbage")
    assert_one_line_error(run("certs", "-o", str(tmp_path)), 1, "cannot load the CA certificate")


def test_manifests_errors_exit_2(tmp_path):
    assert_one_line_error(run("manifests", "--ca-bundle", str(tmp_path / "missing.pem")), 2, "cannot read")
    assert_one_line_error(run("manifests", "--timeout-seconds", "99"), 2, "timeoutSeconds must be between 1 and 30")
    bogus = tmp_path / "ca.pem"
    bogus.write_text("hello")
    assert_one_line_error(run("manifests", "--ca-bundle", str(bogus)), 2, "not a PEM certificate")
