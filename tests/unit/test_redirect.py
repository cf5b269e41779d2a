"""Redirect rules as text (no root needed) and argument validation before any kernel change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from firewall.datapath.redirect import (
    RedirectConfig,
    RedirectError,
    parse_cidrs,
    parse_ports,
    render,
    render_remove,
)


def test_render_is_one_idempotent_transaction():
    text = render(RedirectConfig())
    lines = text.splitlines()
    assert lines[0] == "add table inet palisade"
    assert lines[1] == "flush table inet palisade"
    assert "tproxy to :15006" in text
    assert "redirect to :15001" in text
    assert "tproxy to :15053" in text
    # the proxy's own traffic is exempt by its socket mark (CAP_NET_ADMIN), never by its user
    assert "skuid" not in text and "skgid" not in text
    assert "meta mark 0x53c accept" in text
    assert "meta mark { 0x539, 0x53c } return" in text
    assert "tcp dport { 15020 } ct mark set 0x53d return" in text  # admin port always excluded
    assert "reject with tcp reset" in text       # fail closed
    assert render(RedirectConfig()) == text      # deterministic


def test_exclusions_are_rendered():
    cfg = RedirectConfig(exclude_inbound_ports=(22, 8080), exclude_outbound_ports=(25,),
                         exclude_outbound_cidrs=("169.254.169.254/32", "fd00::/8"))
    text = render(cfg)
    # excluded connections carry a conntrack mark the L3 filter lets through
    assert "tcp dport { 22, 8080, 15020 } ct mark set 0x53d return" in text
    assert "tcp dport { 25 } ct mark set 0x53d return" in text
    assert "ip daddr { 169.254.169.254/32 } meta l4proto tcp ct mark set 0x53d" in text
    assert "ip daddr { 169.254.169.254/32 } return" in text
    assert "ip6 daddr { fd00::/8 } return" in text


def test_remove_is_idempotent_text():
    assert render_remove() == "add table inet palisade\ndelete table inet palisade\n"


@pytest.mark.parametrize("value,expected", [("", ()), ("80", (80,)), ("80, 8080", (80, 8080)),
                                            ("9000-9002", (9000, 9001, 9002))])
def test_parse_ports(value, expected):
    assert parse_ports(value) == expected


@pytest.mark.parametrize("value", ["0", "65536", "http", "10-5", "1-60000"])
def test_parse_ports_rejects(value):
    with pytest.raises(RedirectError):
        parse_ports(value)


def test_parse_cidrs():
    assert parse_cidrs("10.0.0.0/8,fd00::/8") == ("10.0.0.0/8", "fd00::/8")
    with pytest.raises(RedirectError, match="malformed CIDR"):
        parse_cidrs("10.0.0.0/33")


@pytest.mark.parametrize("args,needle", [
    (["--inbound-port", "70000"], "out of range"),
    (["--exclude-outbound-cidrs", "300.1.1.1/8"], "malformed CIDR"),
    (["--exclude-inbound-ports", "abc"], "malformed port"),
])
def test_cli_bad_arguments_exit_2_with_one_line(args, needle):
    # "apply" with bad args must fail before touching the kernel (works even without root)
    p = subprocess.run([sys.executable, "-m", "firewall", "redirect", "apply", *args],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr


def test_cli_show_dry_run_prints_ruleset():
    p = subprocess.run([sys.executable, "-m", "firewall", "redirect", "show", "--dry-run"],
                       capture_output=True, text=True)
    assert p.returncode == 0
    assert p.stdout == render(RedirectConfig())


def test_l3_base_chains_fail_closed_and_drop_what_the_redirect_cannot_take():
    text = render(RedirectConfig())
    for direction, hook in (("in", "input"), ("out", "output")):
        chain = text.split(f"chain l3_{hook} {{", 1)[1].split("\n  }", 1)[0]
        lines = [ln.strip() for ln in chain.strip().splitlines()]
        assert lines[0].startswith(f"type filter hook {hook} priority filter + 10")
        # invalid and SYN+FIN are dropped before anything can accept them (marks included)
        assert lines.index(next(ln for ln in lines if ln.startswith("ct state invalid"))) < \
            lines.index(next(ln for ln in lines if ln.startswith("meta mark {")))
        assert any(ln.startswith("tcp flags & (syn | fin) == syn | fin") and ln.endswith("drop") for ln in lines)
        # a pure SYN conntrack calls invalid (a reused tuple still closing) is not dropped as
        # invalid - conntrack reopens the entry on the SYN/ACK; every other invalid packet is
        invalid = [ln for ln in lines if ln.startswith("ct state invalid")]
        assert invalid and all(ln.endswith("drop") for ln in invalid)
        assert {ln.split(" log ")[0] for ln in invalid} == {
            "ct state invalid meta l4proto != tcp", "ct state invalid tcp flags & (fin | syn | rst | ack) != syn"}
        # TCP neither redirected nor excluded is dropped; the policy chain, then fail closed
        assert any(ln.startswith("meta l4proto tcp log") and ln.endswith("drop") for ln in lines)
        assert lines[-2] == f"jump l3_{direction}_policy" and lines[-1].endswith('no-policy-yet" drop')
        assert "1337" not in " ".join(ln for ln in lines if "meta mark" in ln)
    assert "chain l3_in_policy {" in text and "chain l3_out_pre {" in text
    assert "l3_input" not in render(RedirectConfig(l3=False))
