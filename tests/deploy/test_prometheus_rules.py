"""promtool checks of the Prometheus configuration, the rule files and the rule unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from tests.deploy.prometheus_fixtures import require_binary
from tests.deploy.promql_expressions import PROMETHEUS_DIR, RULE_FILES, RULE_TESTS_FILE, alert_rules

REQUIRED_ALERTS = {
    "ConsumerLagHighAndGrowing",
    "NotConsumingWhileLagging",
    "DeadLetterRateHigh",
    "LatencySLOBurn",
    "StreamerInstanceDown",
    "RestoreTakingTooLong",
    "StateDiscarded",
}


def run_promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    promtool = require_binary("promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_check_rules():
    result = run_promtool("check", "rules", *map(str, RULE_FILES))

    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    # Run from the config's directory: rule_files are relative to it.
    result = run_promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)

    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = run_promtool("test", "rules", str(RULE_TESTS_FILE))

    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_defined():
    missing = REQUIRED_ALERTS - set(alert_rules())

    assert not missing, f"alerts missing from alerts.yml: {sorted(missing)}"


def test_every_alert_tested_firing_and_quiet():
    tests = yaml.safe_load(RULE_TESTS_FILE.read_text(encoding="utf-8"))["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])

    for alert in alert_rules():
        assert alert in firing, f"no promtool test expects {alert} to fire"
        assert alert in quiet, f"no promtool test expects {alert} to stay quiet"


def test_lag_alerts_select_service_mode():
    # Replay jobs report mode="replay" in streamer_build_info and must not fire lag alerts.
    for alert in ("ConsumerLagHighAndGrowing", "NotConsumingWhileLagging"):
        assert 'mode="service"' in alert_rules()[alert], alert


def test_local_prometheus_recipe(tmp_path):
    # deploy/README.md shows how to run Prometheus on the host: copy the rules and targets, rewrite the
    # scrape target with sed, start Prometheus. The same sed expression must give a valid configuration.
    readme = (PROMETHEUS_DIR.parent / "README.md").read_text(encoding="utf-8")
    expression = re.search(r"^sed '([^']+)' deploy/prometheus/prometheus.yml", readme, re.MULTILINE).group(1)
    for folder in ("rules", "targets"):
        shutil.copytree(PROMETHEUS_DIR / folder, tmp_path / folder)
    rewritten = subprocess.run(["sed", expression, str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True,
                               text=True, check=True).stdout
    (tmp_path / "prometheus.yml").write_text(rewritten, encoding="utf-8")

    result = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    targets = yaml.safe_load(rewritten)["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:9400"]
