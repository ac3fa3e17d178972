"""Security settings of the Kafka clients: checks, client options and where the password may come from."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest

from streamer.config import load_settings
from streamer.errors import ConfigError
from streamer.kafka.security import KafkaSecurity


def test_plaintext_adds_no_client_options():
    assert KafkaSecurity().client_options() == {}


def test_sasl_ssl_options(tmp_path):
    security = KafkaSecurity("SASL_SSL", "SCRAM-SHA-512", "alice", "secret")
    options = security.client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == \
        ("SCRAM-SHA-512", "alice", "secret")
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert security.client_options()["ssl_context"] is context  # one context for every client


def test_sasl_plaintext_has_no_tls():
    options = KafkaSecurity("SASL_PLAINTEXT", "PLAIN", "alice", "secret").client_options()
    assert "ssl_context" not in options
    assert options["security_protocol"] == "SASL_PLAINTEXT"


def test_ssl_without_hostname_check_still_verifies_the_chain():
    context = KafkaSecurity("SSL", ssl_check_hostname=False).ssl_context
    assert not context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("arguments, message", [
    (dict(protocol="TLS"), "Invalid security protocol 'TLS'"),
    (dict(protocol="SASL_SSL", sasl_username="alice"), "needs a SASL user name and password"),
    (dict(protocol="SASL_SSL", sasl_password="secret"), "needs a SASL user name and password"),
    (dict(protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="a", sasl_password="b"),
     "Invalid SASL mechanism 'GSSAPI'"),
    (dict(protocol="SSL", sasl_username="alice", sasl_password="secret"), "does not use SASL"),
    (dict(protocol="SASL_PLAINTEXT", sasl_username="a", sasl_password="b", ssl_cafile="ca.pem"),
     "does not use TLS"),
    (dict(protocol="SSL", ssl_cafile="/nonexistent/ca.pem"), "--ssl-cafile file not found"),
])
def test_invalid_combinations_are_rejected(arguments, message):
    with pytest.raises(ConfigError, match=message):
        KafkaSecurity(**arguments)


def test_certificate_needs_its_key(tmp_path):
    certificate = tmp_path / "client.pem"
    certificate.write_text("not used")
    with pytest.raises(ConfigError, match="both --ssl-certfile and --ssl-keyfile"):
        KafkaSecurity("SSL", ssl_certfile=certificate)


def test_unreadable_ca_file_is_a_settings_error(tmp_path):
    cafile = tmp_path / "ca.pem"
    cafile.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="Cannot load the TLS certificates"):
        KafkaSecurity("SSL", ssl_cafile=cafile).client_options()


def test_password_hidden_from_logs(monkeypatch):
    monkeypatch.setenv("STREAMER_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMER_SASL_USERNAME", "alice")
    monkeypatch.setenv("STREAMER_SASL_PASSWORD", "hunter2-secret")
    settings = load_settings()
    security = KafkaSecurity.from_settings(settings)
    assert security.sasl_password == "hunter2-secret"
    assert "hunter2-secret" not in repr(security) + security.describe()
    assert "hunter2-secret" not in str(settings.effective())


def test_run_has_no_password_flag():
    completed = subprocess.run([sys.executable, "-m", "streamer", "run", "--sasl-password", "x"],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "No such option: --sasl-password" in completed.stderr
