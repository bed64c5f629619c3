"""TLS settings from the environment: what turns TLS on, and one clear error for every bad file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.common.server import EXIT_BAD_SETTING
from conveyor.common.settings import ProducerSettings, ResultsSettings, SettingsError, WorkerSettings
from conveyor.common.tls import ClientTLS, ServerTLS, TLSConfigError, system_roots
from tests.support.certs import CertificateAuthority


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("localhost").write(d, "server")
    client_cert, client_key = ca.issue("client", server=False).write(d, "client")
    _, other_key = ca.issue("localhost").write(d, "other")
    (d / "garbage.pem").write_text("not a certificate\n")
    (d / "fake.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    return {
        "ca": str(ca.write(d)),
        "cert": str(server_cert),
        "key": str(server_key),
        "client_cert": str(client_cert),
        "client_key": str(client_key),
        "other_key": str(other_key),
        "garbage": str(d / "garbage.pem"),
        "fake": str(d / "fake.pem"),
        "missing": str(d / "missing.pem"),
        "dir": str(d),
    }


def test_no_tls_variables_mean_plaintext() -> None:
    assert ServerTLS.from_env({}) is None
    client = ClientTLS.from_env({})
    assert not client.enabled
    settings = ProducerSettings.from_env({})
    assert settings.server_tls is None and not settings.client_tls.enabled and settings.health_addr == ""


def test_a_server_certificate_and_key_turn_tls_on(files: dict[str, str]) -> None:
    env = {"CONVEYOR_TLS_CERT_FILE": files["cert"], "CONVEYOR_TLS_KEY_FILE": files["key"]}
    tls = ServerTLS.from_env(env)
    assert tls == ServerTLS(files["cert"], files["key"]) and not tls.mutual
    mutual = ServerTLS.from_env({**env, "CONVEYOR_TLS_CLIENT_CA_FILE": files["ca"]})
    assert mutual is not None and mutual.mutual
    for settings in (ProducerSettings, WorkerSettings, ResultsSettings):
        loaded = settings.from_env({**env, "CONVEYOR_HEALTH_ADDR": "0.0.0.0:8081"})
        assert loaded.server_tls == tls and loaded.health_addr == "0.0.0.0:8081"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CONVEYOR_TLS_CERT_FILE": "cert"}, "CONVEYOR_TLS_KEY_FILE is not set"),
        ({"CONVEYOR_TLS_KEY_FILE": "key"}, "CONVEYOR_TLS_CERT_FILE is not set"),
        ({"CONVEYOR_TLS_CLIENT_CA_FILE": "ca"}, "client certificates need TLS"),
        ({"CONVEYOR_TLS_CERT_FILE": "missing", "CONVEYOR_TLS_KEY_FILE": "key"}, "cannot read the certificate"),
        ({"CONVEYOR_TLS_CERT_FILE": "garbage", "CONVEYOR_TLS_KEY_FILE": "key"}, "certificate is not PEM"),
        ({"CONVEYOR_TLS_CERT_FILE": "cert", "CONVEYOR_TLS_KEY_FILE": "missing"}, "cannot read the private key"),
        ({"CONVEYOR_TLS_CERT_FILE": "cert", "CONVEYOR_TLS_KEY_FILE": "other_key"}, "not a certificate and its private"),
        ({"CONVEYOR_TLS_CERT_FILE": "fake", "CONVEYOR_TLS_KEY_FILE": "key"}, "not a certificate and its private"),
        (
            {"CONVEYOR_TLS_CERT_FILE": "cert", "CONVEYOR_TLS_KEY_FILE": "key", "CONVEYOR_TLS_CLIENT_CA_FILE": "fake"},
            "CONVEYOR_TLS_CLIENT_CA_FILE",
        ),
        (
            {"CONVEYOR_TLS_CERT_FILE": "cert", "CONVEYOR_TLS_KEY_FILE": "key", "CONVEYOR_TLS_CLIENT_CA_FILE": "dir"},
            "cannot read the CA certificate",
        ),
    ],
)
def test_a_bad_server_setting_names_the_variable_and_the_problem(
    files: dict[str, str], env: dict[str, str], says: str
) -> None:
    resolved = {k: files.get(v, v) for k, v in env.items()}
    with pytest.raises(TLSConfigError, match=says):
        ServerTLS.from_env(resolved)
    # Through the settings it is a SettingsError, which every service turns into exit 78.
    with pytest.raises(SettingsError, match=says):
        ProducerSettings.from_env(resolved)


def test_client_tls_from_the_environment(files: dict[str, str]) -> None:
    assert ClientTLS.from_env({"CONVEYOR_TLS": "1"}) == ClientTLS(enabled=True)
    assert not ClientTLS.from_env({"CONVEYOR_TLS": "0"}).enabled
    with_ca = ClientTLS.from_env({"CONVEYOR_TLS_CA_FILE": files["ca"]})
    assert with_ca.enabled and with_ca.ca_file == files["ca"]  # a CA alone turns TLS on
    full = ClientTLS.from_env(
        {
            "CONVEYOR_TLS_CA_FILE": files["ca"],
            "CONVEYOR_TLS_CLIENT_CERT_FILE": files["client_cert"],
            "CONVEYOR_TLS_CLIENT_KEY_FILE": files["client_key"],
            "CONVEYOR_TLS_SERVER_NAME": "conveyor.internal",
        }
    )
    assert full == ClientTLS(True, files["ca"], files["client_cert"], files["client_key"], "conveyor.internal")
    assert full.options() == [("grpc.ssl_target_name_override", "conveyor.internal")]
    assert ProducerSettings.from_env({"CONVEYOR_TLS_CA_FILE": files["ca"]}).client_tls == with_ca


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"CONVEYOR_TLS": "maybe"}, "CONVEYOR_TLS='maybe': expected 1 or 0"),
        ({"CONVEYOR_TLS_CLIENT_CERT_FILE": "client_cert"}, "CONVEYOR_TLS_CLIENT_KEY_FILE is not"),
        ({"CONVEYOR_TLS_CLIENT_KEY_FILE": "client_key"}, "CONVEYOR_TLS_CLIENT_CERT_FILE is not"),
        ({"CONVEYOR_TLS_CA_FILE": "missing"}, "CONVEYOR_TLS_CA_FILE=.*cannot read the CA certificate"),
        ({"CONVEYOR_TLS_CA_FILE": "garbage"}, "CA certificate is not PEM"),
        (
            {"CONVEYOR_TLS_CLIENT_CERT_FILE": "client_cert", "CONVEYOR_TLS_CLIENT_KEY_FILE": "other_key"},
            "not a certificate and its private key",
        ),
    ],
)
def test_a_bad_client_setting_names_the_variable(files: dict[str, str], env: dict[str, str], says: str) -> None:
    resolved = {k: files.get(v, v) for k, v in env.items()}
    with pytest.raises(TLSConfigError, match=says):
        ClientTLS.from_env(resolved)


def test_system_roots_are_the_system_ca_bundle() -> None:
    roots = system_roots()
    if roots is not None:  # None: gRPC's own roots (no system bundle on this machine)
        assert b"-----BEGIN CERTIFICATE-----" in roots


@pytest.mark.parametrize("service", ["producer", "results", "worker"])
def test_a_service_with_an_unreadable_certificate_exits_78_with_one_line(files: dict[str, str], service: str) -> None:
    env = {
        **os.environ,
        "CONVEYOR_TLS_CERT_FILE": files["missing"],
        "CONVEYOR_TLS_KEY_FILE": files["key"],
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "CONVEYOR_METRICS_ADDR": "off",
    }
    done = subprocess.run(
        [sys.executable, "-m", f"conveyor.{service}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_BAD_SETTING, done.stderr
    assert done.stderr.startswith(f"error: CONVEYOR_TLS_CERT_FILE={files['missing']}: cannot read the certificate")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert Path(files["missing"]).name in done.stderr
