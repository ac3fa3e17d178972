"""The service and topic backtests on a broker whose listener requires TLS and SASL (SASL_SSL, PLAIN).

The tests create topics, produce events and read outputs through the broker's PLAINTEXT listener. The
service and the replay connect only through the SASL_SSL listener.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streamer.io.files import read_outputs
from streamer.kafka.local_broker import LocalKafka
from tests.kafka_fixtures import BROKER_START_TIMEOUT_S
from tests.service.service_helpers import ServiceProcess, create_topics, free_port, produce, read_topic
from tests.service.test_service import make_events, model_path, names  # noqa: F401 (model_path is a fixture)

pytestmark = pytest.mark.kafka

USER, PASSWORD = "alice", "alice-secret"
KEYSTORE_PASSWORD = "keystore-secret"


def make_keystore(folder: Path) -> Path:
    """Write a PKCS12 keystore with a self-signed certificate for 127.0.0.1; return that certificate as PEM."""
    keystore, certificate = folder / "broker.p12", folder / "ca.pem"
    subprocess.run(["keytool", "-genkeypair", "-keystore", str(keystore), "-storetype", "PKCS12",
                    "-storepass", KEYSTORE_PASSWORD, "-keypass", KEYSTORE_PASSWORD, "-alias", "broker",
                    "-keyalg", "RSA", "-keysize", "2048", "-validity", "2", "-dname", "CN=127.0.0.1",
                    "-ext", "SAN=IP:127.0.0.1,DNS:localhost", "-ext", "BC=ca:true"],
                   check=True, capture_output=True)
    subprocess.run(["keytool", "-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore),
                    "-storepass", KEYSTORE_PASSWORD, "-file", str(certificate)], check=True, capture_output=True)
    return certificate


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory):
    """A broker with a SASL_SSL listener; yields (broker, its SASL_SSL bootstrap address, the CA file)."""
    folder = tmp_path_factory.mktemp("secured-kafka")
    cafile = make_keystore(folder)
    port = free_port()
    jaas = ('org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" '
            f'password="admin-secret" user_admin="admin-secret" user_{USER}="{PASSWORD}";')
    broker = LocalKafka(folder / "data", extra_listeners={"SASL_SSL": port}, extra_properties={
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": jaas,
        "ssl.keystore.location": str(folder / "broker.p12"),
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.password": KEYSTORE_PASSWORD,
        "ssl.key.password": KEYSTORE_PASSWORD,
    })
    broker.start(timeout_s=BROKER_START_TIMEOUT_S)
    try:
        yield broker, f"127.0.0.1:{port}", cafile
    finally:
        broker.stop()


def security_variables(cafile: Path, password: str = PASSWORD) -> dict[str, str]:
    return {"STREAMER_SECURITY_PROTOCOL": "SASL_SSL", "STREAMER_SASL_MECHANISM": "PLAIN",
            "STREAMER_SASL_USERNAME": USER, "STREAMER_SASL_PASSWORD": password, "STREAMER_SSL_CAFILE": str(cafile)}


def secured_service(tmp_path, secured_address, cafile, monkeypatch, password: str = PASSWORD, **settings):
    for name, value in security_variables(cafile, password).items():
        monkeypatch.setenv(name, value)
    return ServiceProcess(tmp_path, bootstrap_servers=secured_address, **settings)


def test_service_restore_and_replay_over_sasl_ssl(secured_broker, model_path, tmp_path, monkeypatch):
    broker, secured_address, cafile = secured_broker
    plain = broker.bootstrap_servers
    topics = names("secured")
    asyncio.run(create_topics(plain, {topics["input_topics"]: 2}))
    events = make_events(60, 6)
    asyncio.run(produce(plain, topics["input_topics"], events[:40]))

    service = secured_service(tmp_path, secured_address, cafile, monkeypatch, model=model_path, topic_partitions=2,
                              changelog="true", **topics)
    try:
        service.wait_ready()
        first = asyncio.run(read_topic(plain, topics["output_topic"], 40))
    finally:
        assert service.stop() == 0, service.log()
    assert len(first) == 40
    assert "SASL_SSL (PLAIN as alice)" in service.log()
    assert PASSWORD not in service.log()

    # A restart restores every entity from the changelog through the secured listener, so steps go on.
    service = secured_service(tmp_path, secured_address, cafile, monkeypatch, model=model_path, topic_partitions=2,
                              changelog="true", **topics)
    try:
        service.wait_ready()
        asyncio.run(produce(plain, topics["input_topics"], events[40:]))
        outputs = asyncio.run(read_topic(plain, topics["output_topic"], 60))
    finally:
        assert service.stop() == 0, service.log()
    assert len(outputs) == 60
    live = [orjson.loads(record.value) for record in outputs]
    steps: dict[str, list[int]] = {}
    for output in live:
        steps.setdefault(output["entity"], []).append(output["step"])
    assert {entity: sorted(values) for entity, values in steps.items()} == {f"e{i}": list(range(1, 11))
                                                                          for i in range(6)}

    # A topic backtest reads the same events through the secured listener and gives the same predictions.
    replay = tmp_path / "replay.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "streamer", "backtest", "--model", str(model_path), "--topic", topics["input_topics"],
         "--bootstrap-servers", secured_address, "--output", str(replay)],
        env={**os.environ, **security_variables(cafile)}, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    replayed = {(o["source"]["partition"], o["source"]["offset"]): o["prediction"] for o in read_outputs(replay)}
    assert len(replayed) == 60
    for output in live:
        source = output["source"]
        assert replayed[source["partition"], source["offset"]] == pytest.approx(output["prediction"], abs=1e-5)


def test_wrong_password_logged_and_stops(secured_broker, model_path, tmp_path, monkeypatch):
    broker, secured_address, cafile = secured_broker
    topics = names("secured-denied")
    service = secured_service(tmp_path, secured_address, cafile, monkeypatch, password="not-the-password",
                              model=model_path, request_timeout_ms=2000, **topics)
    try:
        service.wait_for_log("Authentication failed")
        assert service.get("/readyz")[0] == 503
    finally:
        assert service.stop(timeout_s=60) == 0, service.log()
    assert "not-the-password" not in service.log()


def test_untrusted_broker_certificate_rejected(secured_broker, model_path, tmp_path, monkeypatch):
    broker, secured_address, _ = secured_broker
    other_ca = make_keystore(tmp_path)  # a certificate that did not sign the broker's
    topics = names("secured-untrusted")
    service = secured_service(tmp_path, secured_address, other_ca, monkeypatch, model=model_path,
                              request_timeout_ms=2000, **topics)
    try:
        service.wait_for_log("CERTIFICATE_VERIFY_FAILED")
        assert service.get("/readyz")[0] == 503
    finally:
        assert service.stop(timeout_s=60) == 0, service.log()
