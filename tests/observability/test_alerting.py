"""The shipped alert rules and Grafana dashboard: valid, unit-tested, and naming only metrics a
real replica exports.

promtool comes with Debian's ``prometheus`` package (``./dev test`` installs it); without it
the promtool tests skip, the metric-name test still runs.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.harness import free_port
from tests.support import make_settings, start_replica, stop_replica, write_config

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULES_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "biomero-importer.json"
# Written by Prometheus itself for every scrape target, not by the replica.
SYNTHETIC = {"up"}
# A metric name in PromQL: a name of ours or of the process collector, never a label or function.
METRIC_NAME = re.compile(r"\b(?:biomero_importer|process|python)_[a-z0-9_]+\b|\bup\b(?=\{)")
# The alerts the issue asks for, by what they watch.
EXPECTED_ALERTS = {
    "BiomeroImporterReplicaDown",
    "BiomeroImporterReplicaUnhealthy",
    "BiomeroImporterQueueStalled",
    "BiomeroImporterFailureRatioHigh",
    "BiomeroImporterListenerReconnectStorm",
    "BiomeroImporterEventLoopLag",
    "BiomeroImporterNotificationsStuck",
    "BiomeroImporterNotificationGivenUp",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    return subprocess.run(
        [promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )


def _rules() -> list[dict[str, str]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_alert_rules_pass_promtool_check() -> None:
    checked = _promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in checked.stdout


def test_alert_rules_unit_tests_pass() -> None:
    tested = _promtool("test", "rules", RULES_TEST.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested() -> None:
    assert {rule["alert"] for rule in _rules()} == EXPECTED_ALERTS
    tests = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert firing == EXPECTED_ALERTS


def _scrape(port: int, timeout: float = 30) -> set[str]:
    """Every sample name of a replica's first answered /metrics, and every metric it declares:
    an idle replica exports the per-order progress gauges (HELP and TYPE) without samples."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            families = list(text_string_to_metric_families(text))
            return {family.name for family in families} | {
                sample.name for family in families for sample in family.samples
            }
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def test_dashboard_and_rules_name_only_exported_metrics(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    port = free_port()
    settings = make_settings(tmp_path, migrated_url, [import_root], metrics_port=port)
    replica = start_replica(write_config(tmp_path / "replica.yml", settings))
    try:
        exported = await asyncio.to_thread(_scrape, port)
    finally:
        assert await asyncio.to_thread(stop_replica, replica, timeout=30) == 0

    exprs = {"dashboard": _dashboard_exprs(), "rules": [rule["expr"] for rule in _rules()]}
    for source, texts in exprs.items():
        named = {name for text in texts for name in METRIC_NAME.findall(text)}
        assert len(named) > 5, (source, named)
        unknown = sorted(named - exported - SYNTHETIC)
        assert not unknown, f"{source} names metrics a replica does not export: {unknown}"
    # The dashboard shows every metric of the service's own.
    ours = {name for name in exported if name.startswith("biomero_importer_")}
    shown = {name for text in exprs["dashboard"] for name in METRIC_NAME.findall(text)}
    families = {re.sub(r"_(bucket|count|sum|created|total)$", "", name) for name in shown}
    missing = sorted(
        name
        for name in ours
        if re.sub(r"_(bucket|count|sum|created|total)$", "", name) not in families
    )
    assert not missing, f"the dashboard shows nothing of {missing}"
