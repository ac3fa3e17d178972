"""PromQL expressions of the repository's rules and dashboard, and small PromQL text helpers.

The helpers work on the text of an expression and cover the PromQL that this
repository writes: selectors, range vectors, function calls, aggregations with
``by``/``without``, vector matching with ``on``/``ignoring``/``group_left``, set
operators and comparisons with constants. They are not a full PromQL parser.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY_DIR / "prometheus"
RULE_FILES = (PROMETHEUS_DIR / "rules" / "recording.yml", PROMETHEUS_DIR / "rules" / "alerts.yml")
RULE_TESTS_FILE = PROMETHEUS_DIR / "tests" / "alerts_test.yml"
DASHBOARD_FILE = DEPLOY_DIR / "grafana" / "dashboards" / "streamer.json"

# Values that the Grafana variables of the dashboard are replaced with before a query is sent to Prometheus.
GRAFANA_VARIABLE_VALUES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$job": ".+",
    "$instance": ".+",
}

# Series that Prometheus itself creates for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}

_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_CONSTANT = re.compile(r"^[\d.\s()*+\-/eE]+$")
_SET_OPERATORS = ("and", "or", "unless")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
_MATCHING_PREFIX = re.compile(r"^(?:on|ignoring)\s*\([^)]*\)\s*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Expression:
    """One PromQL expression and where it comes from (a rule name or a dashboard panel)."""

    source: str
    expr: str


def load_rules() -> list[dict]:
    """Return every rule of the repository's rule files, recording rules first."""
    rules = []
    for path in RULE_FILES:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            rules.extend(group["rules"])
    return rules


def recording_rules() -> dict[str, str]:
    """Return recorded series name -> expression."""
    return {rule["record"]: rule["expr"].strip() for rule in load_rules() if "record" in rule}


def alert_rules() -> dict[str, str]:
    """Return alert name -> expression."""
    return {rule["alert"]: rule["expr"].strip() for rule in load_rules() if "alert" in rule}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def dashboard_expressions(dashboard: dict | None = None) -> list[Expression]:
    """Return the ``expr`` of every panel target, as written (with Grafana variables)."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expressions.append(Expression(f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    return expressions


def dashboard_variable_selectors(dashboard: dict | None = None) -> list[Expression]:
    """Return the series selector inside each ``label_values(selector, label)`` variable query."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    selectors = []
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(query)
        if match is None:
            raise ValueError(f"variable {variable['name']!r} has a query that is not label_values(selector, label): {query}")
        selectors.append(Expression(f"variable {variable['name']!r}", match.group("selector")))
    return selectors


def substitute_grafana_variables(expr: str) -> str:
    """Replace the dashboard's Grafana variables with values Prometheus accepts."""
    for variable in sorted(GRAFANA_VARIABLE_VALUES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLE_VALUES[variable])
    if "$" in expr:
        raise ValueError(f"expression has a Grafana variable without a value in GRAFANA_VARIABLE_VALUES: {expr}")
    return expr


def metric_names(expr: str) -> set[str]:
    """Return the metric names (and recorded series names) that an expression selects."""
    text = _STRING.sub('""', expr)
    text = _remove_bracketed(text, "{", "}")
    text = _remove_bracketed(text, "[", "]")
    text = _GROUPING_CLAUSE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(1)
        following = text[match.end():].lstrip()
        if following.startswith("("):  # a function or an aggregation operator
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def base_expressions(expr: str) -> list[str]:
    """Split an expression at its top-level set operators and drop comparisons with constants.

    ``a > 10 and on (job) rate(b[5m]) == 0`` becomes ``["a", "rate(b[5m])"]``.
    Each part is the series an alert's condition is built from, so each must return
    data even while the condition is false.
    """
    expr = expr.strip()
    inner = _strip_enclosing_parentheses(expr)
    if inner != expr:
        return base_expressions(inner)

    operands = _split_top_level_words(expr, _SET_OPERATORS)
    if len(operands) > 1:
        parts = []
        for operand in operands:
            parts.extend(base_expressions(_MATCHING_PREFIX.sub("", operand.strip())))
        return parts

    split = _last_top_level_comparison(expr)
    if split is not None:
        left, right = split
        right = re.sub(r"^bool\b", "", right.strip()).strip()
        if _CONSTANT.match(right):
            return base_expressions(left)
    return [expr]


def _top_level_positions(expr: str) -> list[tuple[int, str]]:
    """Return (index, character) for every character outside brackets and strings."""
    positions = []
    depth = 0
    quote = None
    escaped = False
    for index, char in enumerate(expr):
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
            continue
        if char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            positions.append((index, char))
    return positions


def _strip_enclosing_parentheses(expr: str) -> str:
    if not (expr.startswith("(") and expr.endswith(")")):
        return expr
    depth = 0
    for index, char in enumerate(expr):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0 and index != len(expr) - 1:
                return expr  # the first parenthesis closes before the end: "(a) + (b)"
    return expr[1:-1].strip()


def _split_top_level_words(expr: str, words: tuple[str, ...]) -> list[str]:
    top_level = {index for index, _ in _top_level_positions(expr)}
    pattern = re.compile(r"(?<![\w:])(" + "|".join(words) + r")(?![\w:])")
    parts = []
    start = 0
    for match in pattern.finditer(expr):
        if match.start() in top_level:
            parts.append(expr[start:match.start()])
            start = match.end()
    parts.append(expr[start:])
    return parts


def _last_top_level_comparison(expr: str) -> tuple[str, str] | None:
    positions = _top_level_positions(expr)
    characters = dict(positions)
    last = None
    for index, char in positions:
        if char not in "=!<>":
            continue
        pair = char + characters.get(index + 1, "")
        if pair in _COMPARISONS:
            last = (index, 2)
        elif char in "<>" and characters.get(index - 1, "") not in "=!<>":
            last = (index, 1)
    if last is None:
        return None
    index, width = last
    return expr[:index], expr[index + width:]


def _remove_bracketed(text: str, opening: str, closing: str) -> str:
    result = []
    depth = 0
    for char in text:
        if char == opening:
            depth += 1
            if depth == 1:
                result.append(opening)
            continue
        if char == closing and depth > 0:
            depth -= 1
            if depth == 0:
                result.append(closing)
            continue
        if depth == 0:
            result.append(char)
    return "".join(result)


def exposed_metric_names(registry) -> set[str]:
    """Return every sample name the collectors of ``registry`` can export, from their metric families."""
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update({family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")})
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


def rule_and_dashboard_expressions() -> list[Expression]:
    """Return every expression that must return data from a scraped streamer.

    Recorded series names, recording rule expressions, the base expressions of
    every alert (see ``base_expressions``) and the dashboard targets with their
    Grafana variables replaced.
    """
    expressions = []
    for name, expr in recording_rules().items():
        expressions.append(Expression(f"recorded series {name}", name))
        expressions.append(Expression(f"recording rule {name}", expr))
    for name, expr in alert_rules().items():
        for index, part in enumerate(base_expressions(expr)):
            expressions.append(Expression(f"alert {name} part {index}", part))
    for expression in dashboard_expressions():
        expressions.append(Expression(expression.source, substitute_grafana_variables(expression.expr)))
    return expressions
