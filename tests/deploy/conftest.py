"""Fixtures of the deploy tests."""

from tests.deploy.prometheus_fixtures import prometheus_factory  # noqa: F401 (a fixture, used by name)
