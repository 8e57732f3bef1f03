"""deploy/prometheus/alerts.yml: promtool checks the rules and runs their unit tests
(alerts_test.yml); every alert has a firing and a silent case there; every pacsnode_* metric the
rules use is one the node exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import REPO

RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
UNIT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; scripts/system-deps.sh installs it (Debian: prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    run = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in run.stdout


def test_promtool_unit_tests_pass() -> None:
    run = subprocess.run(
        [_promtool(), "test", "rules", str(UNIT_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=UNIT_TESTS.parent,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_fires_and_stays_silent_in_the_unit_tests() -> None:
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    alerts = {r["alert"] for r in _rules()}
    assert alerts == set(cases)
    assert all(seen == {True, False} for seen in cases.values()), cases


def test_rules_use_metrics_the_node_exports() -> None:
    """A renamed metric would leave an alert that never fires: every pacsnode_* name in the rules
    is one of node/prometheus.py's (counters with their _total suffix)."""
    from node.prometheus import NodeMetrics

    exported = set()
    for family in NodeMetrics().registry.collect():
        exported |= {family.name, f"{family.name}_total" if family.type == "counter" else family.name}
    # the store's gauges, and the monitoring gauges (node/monitoring/gauges.py, computed at scrape time)
    source = "".join((REPO / "node" / p).read_text() for p in ("prometheus.py", "monitoring/gauges.py"))
    exported |= {f"pacsnode_{m}" for m in re.findall(r'f"\{PREFIX\}_(\w+)"', source)}
    used = {name for r in _rules() for name in re.findall(r"\bpacsnode_\w+", r["expr"])}
    assert used and used <= exported, used - exported
    assert any(r["alert"] == "PacsNodeDown" and "up{" in r["expr"] for r in _rules())
