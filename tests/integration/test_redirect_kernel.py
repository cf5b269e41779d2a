"""apply/remove against the kernel in a scratch namespace."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.netns


def test_apply_twice_same_ruleset_and_remove_leaves_nothing(cluster):
    pod = cluster.pod("p")
    pod.redirect("apply", "--exclude-outbound-cidrs", "169.254.169.254/32")
    first = pod.run(["nft", "list", "ruleset"]).stdout
    rules1 = pod.run(["ip", "rule"]).stdout
    pod.redirect("apply", "--exclude-outbound-cidrs", "169.254.169.254/32")
    assert pod.run(["nft", "list", "ruleset"]).stdout == first
    assert pod.run(["ip", "rule"]).stdout == rules1
    assert "fwmark 0x539 lookup 133" in rules1
    assert "local default dev lo" in pod.run(["ip", "route", "show", "table", "133"]).stdout
    pod.redirect("remove")
    assert "palisade" not in pod.run(["nft", "list", "ruleset"]).stdout
    assert "0x539" not in pod.run(["ip", "rule"]).stdout
    pod.redirect("remove")  # idempotent


def test_bad_argument_changes_nothing(cluster):
    pod = cluster.pod("p")
    r = pod.run(["python3", "-m", "firewall", "redirect", "apply", "--exclude-outbound-cidrs", "x/99"],
                check=False, cwd=str(__import__("tests.harness", fromlist=["REPO"]).REPO))
    assert r.returncode == 2
    assert pod.run(["nft", "list", "ruleset"]).stdout.strip() == ""
