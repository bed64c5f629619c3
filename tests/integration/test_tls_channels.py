"""TLS and mTLS over real gRPC channels: refusals, tokens over TLS, certificates reloaded without a restart.

The server is Conveyor's own bootstrap (conveyor.common.server.start) hosting AdminService on the
session Redis, with a token file; certificates come from tests/support/certs.py.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conveyor.common import auth, server
from conveyor.common.auth import Authorizer, Role, TokenFile
from conveyor.common.redis import REDIS_UNAVAILABLE, make_redis
from conveyor.common.scripts import Scripts
from conveyor.common.tls import ClientTLS, ReloadingChannel, ServerTLS
from conveyor.producer.admin import AdminServicer
from conveyor.producer.controls import QueueControls
from conveyor.producer.dead_letters import DeadLetters
from conveyor.producer.history import History
from conveyor.producer.limits import FlowLimits
from conveyor.producer.stats import Stats
from conveyor.v1 import admin_service_pb2, admin_service_pb2_grpc
from tests.support.certs import CertificateAuthority, serial_of, serial_of_der
from tests.support.wait import wait_for

LIST = admin_service_pb2.ListQueuesRequest()


@dataclass
class Tls:
    dir: Path
    ca: CertificateAuthority
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    reader: str


@pytest.fixture
def certs(tmp_path: Path) -> Tls:
    ca = CertificateAuthority()
    server_cert, server_key = ca.issue("localhost").write(tmp_path, "server")
    client_cert, client_key = ca.issue("client-a", server=False).write(tmp_path, "client")
    return Tls(tmp_path, ca, ca.write(tmp_path), server_cert, server_key, client_cert, client_key, auth.new_token())


@dataclass
class Running:
    addr: str
    running: server.RunningServer


async def _serve(redis_url: str, certs: Tls, *, mutual: bool, health_addr: str = "") -> AsyncIterator[Running]:
    client = make_redis(redis_url)
    history = History("")
    tokens = certs.dir / "tokens.toml"
    tokens.write_text(auth.entry_for(certs.reader, "viewer", Role.READER))
    admin = AdminServicer(
        DeadLetters(client, Scripts(client)),
        QueueControls(client),
        FlowLimits(Scripts(client)),
        stats=Stats(client, history),
    )
    tls = ServerTLS(str(certs.server_cert), str(certs.server_key), str(certs.ca_file) if mutual else "")
    running = await server.start(
        "127.0.0.1:0",
        [
            server.Service(
                admin_service_pb2_grpc.add_AdminServiceServicer_to_server,
                admin,
                admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            )
        ],
        unavailable=REDIS_UNAVAILABLE,
        auth=Authorizer(TokenFile(tokens)),
        tls=tls,
        health_addr=health_addr,
    )
    try:
        yield Running(f"127.0.0.1:{running.port}", running)
    finally:
        await running.stop(0.1)
        await history.close()
        await client.aclose()


@pytest.fixture
async def tls_server(redis_client: redis.asyncio.Redis, redis_url: str, certs: Tls) -> AsyncIterator[Running]:
    async for r in _serve(redis_url, certs, mutual=False):
        yield r


@pytest.fixture
async def mtls_server(redis_client: redis.asyncio.Redis, redis_url: str, certs: Tls) -> AsyncIterator[Running]:
    async for r in _serve(redis_url, certs, mutual=True, health_addr="127.0.0.1:0"):
        yield r


def _client(certs: Tls, *, cert: bool = True, ca_file: Path | None = None, server_name: str = "") -> ClientTLS:
    return ClientTLS.create(
        ca_file=str(ca_file or certs.ca_file),
        cert_file=str(certs.client_cert) if cert else "",
        key_file=str(certs.client_key) if cert else "",
        server_name=server_name,
    )


async def _list(channel: grpc.aio.Channel, within: float = 5.0) -> admin_service_pb2.ListQueuesResponse:
    return await admin_service_pb2_grpc.AdminServiceStub(channel).ListQueues(LIST, timeout=within)


async def _code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await _list(channel, within=3.0)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()
    return grpc.StatusCode.OK


def _peer_serial(addr: str, certs: Tls, *, ca_file: Path | None = None) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    context = ssl.create_default_context(cafile=str(ca_file or certs.ca_file))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    context.set_alpn_protocols(["h2"])
    host, _, port = addr.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of_der(der)


async def test_a_token_is_checked_over_tls(tls_server: Running, certs: Tls) -> None:
    assert (
        await _code(auth.dial(tls_server.addr, "", tls=_client(certs, cert=False))) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert await _code(auth.dial(tls_server.addr, "cvy_wrong", tls=_client(certs, cert=False))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    channel = auth.dial(tls_server.addr, certs.reader, tls=_client(certs, cert=False))
    try:
        await _list(channel)  # a reader may list queues: the token travelled over TLS and was accepted
    finally:
        await channel.close()


async def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server: Running, certs: Tls) -> None:
    channel = auth.dial(tls_server.addr, certs.reader, tls=ClientTLS())
    assert await _code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_trusting_another_ca_refuses_the_server(tls_server: Running, certs: Tls) -> None:
    other = CertificateAuthority("another CA").write(certs.dir / "other")
    channel = auth.dial(tls_server.addr, certs.reader, tls=_client(certs, cert=False, ca_file=other))
    assert await _code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_the_server_name_can_be_overridden(redis_client: redis.asyncio.Redis, redis_url: str, certs: Tls) -> None:
    # A certificate for a service name only: dialling 127.0.0.1 needs the name given.
    certs.ca.issue("conveyor.internal", dns=("conveyor.internal",), ips=()).write(certs.dir, "server")
    async for running in _serve(redis_url, certs, mutual=False):
        plain = auth.dial(running.addr, certs.reader, tls=_client(certs, cert=False))
        assert await _code(plain) == grpc.StatusCode.UNAVAILABLE
        named = auth.dial(running.addr, certs.reader, tls=_client(certs, cert=False, server_name="conveyor.internal"))
        assert await _code(named) == grpc.StatusCode.OK


async def test_mtls_refuses_a_client_without_a_certificate(mtls_server: Running, certs: Tls) -> None:
    channel = auth.dial(mtls_server.addr, certs.reader, tls=_client(certs, cert=False))
    assert await _code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: Running, certs: Tls) -> None:
    stranger = CertificateAuthority("stranger CA").issue("mallory", server=False)
    cert, key = stranger.write(certs.dir / "stranger", "client")
    tls = ClientTLS.create(ca_file=str(certs.ca_file), cert_file=str(cert), key_file=str(key))
    assert await _code(auth.dial(mtls_server.addr, certs.reader, tls=tls)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_admits_a_client_certificate_and_still_checks_the_token(mtls_server: Running, certs: Tls) -> None:
    assert await _code(auth.dial(mtls_server.addr, "", tls=_client(certs))) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(auth.dial(mtls_server.addr, certs.reader, tls=_client(certs))) == grpc.StatusCode.OK


async def test_the_health_port_serves_health_alone_in_plaintext(mtls_server: Running, certs: Tls) -> None:
    assert mtls_server.running.health_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mtls_server.running.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list(channel)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Reflection there names health (and itself) only: grpcurl can call Check, nothing else.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = [
            r async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        ]
        assert {s.name for s in replies[0].list_services_response.service} == {
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
    # Both ports tell the same status.
    await mtls_server.running.set_serving(False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mtls_server.running.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def _replace(path: Path, data: bytes) -> None:
    """Replace a file atomically (write beside it, rename), as a certificate manager does."""
    tmp = path.with_suffix(path.suffix + ".new")
    tmp.write_bytes(data)
    if path.suffix == ".key":
        tmp.chmod(0o600)
    os.replace(tmp, path)


async def test_replaced_server_certificate_files_serve_new_connections_without_a_restart(
    mtls_server: Running, certs: Tls
) -> None:
    first = _peer_serial(mtls_server.addr, certs)
    assert first == serial_of(certs.server_cert.read_bytes())
    long_lived = auth.dial(mtls_server.addr, certs.reader, tls=_client(certs))
    try:
        await _list(long_lived)
        renewed = certs.ca.issue("localhost")
        # The certificate first, then the key: in between the pair does not match and the old one stays.
        _replace(certs.server_cert, renewed.cert_pem)
        assert _peer_serial(mtls_server.addr, certs) == first
        _replace(certs.server_key, renewed.key_pem)
        assert _peer_serial(mtls_server.addr, certs) == serial_of(renewed.cert_pem)
        # The connection made before keeps working.
        await _list(long_lived)
    finally:
        await long_lived.close()
    assert await _code(auth.dial(mtls_server.addr, certs.reader, tls=_client(certs))) == grpc.StatusCode.OK


async def test_a_long_lived_channel_dials_again_when_its_ca_and_certificate_files_change(
    mtls_server: Running, certs: Tls
) -> None:
    channel = ReloadingChannel(
        mtls_server.addr, _client(certs), interceptors=auth.bearer_interceptors(certs.reader), check_every_s=0.0
    )
    try:
        await _list(channel)
        # The operator moves everything to a new CA: server certificate, client CA, client certificate.
        new_ca = CertificateAuthority("rotated CA")
        new_server, new_client = new_ca.issue("localhost"), new_ca.issue("client-a", server=False)
        _replace(certs.dir / "ca-new.crt", new_ca.cert_pem)
        bundle = certs.ca_file.read_bytes() + new_ca.cert_pem  # the server trusts both CAs while clients move
        _replace(certs.ca_file, bundle)
        _replace(certs.server_cert, new_server.cert_pem)
        _replace(certs.server_key, new_server.key_pem)
        assert _peer_serial(mtls_server.addr, certs) == serial_of(new_server.cert_pem)
        _replace(certs.client_cert, new_client.cert_pem)
        _replace(certs.client_key, new_client.key_pem)
        _replace(certs.ca_file, new_ca.cert_pem)  # the client's trust (same file here) now the new CA alone
        # The same channel object: its next call dials again with the new files.
        await wait_for(lambda: _ok(channel), "the channel to dial again with the new files", within=10)
        assert channel.generation >= 1
    finally:
        await channel.close()


async def _ok(channel: grpc.aio.Channel) -> bool:
    try:
        await _list(channel, within=2.0)
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_a_half_replaced_client_certificate_keeps_the_current_channel(mtls_server: Running, certs: Tls) -> None:
    channel = ReloadingChannel(
        mtls_server.addr, _client(certs), interceptors=auth.bearer_interceptors(certs.reader), check_every_s=0.0
    )
    try:
        await _list(channel)
        renewed = certs.ca.issue("client-a", server=False)
        _replace(certs.client_cert, renewed.cert_pem)  # the new certificate, the old key: no pair yet
        await _list(channel)
        assert channel.generation == 0
        _replace(certs.client_key, renewed.key_pem)
        await _list(channel)
        assert channel.generation == 1
    finally:
        await channel.close()


async def test_tls_with_the_system_roots_trusts_what_the_system_bundle_holds(
    tls_server: Running, certs: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CONVEYOR_TLS=1 and no CA file: the system's CA bundle, which OpenSSL's SSL_CERT_FILE names.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    tls = ClientTLS.from_env({"CONVEYOR_TLS": "1"})
    assert tls.enabled and not tls.ca_file
    assert await _code(auth.dial(tls_server.addr, certs.reader, tls=tls)) == grpc.StatusCode.OK
    monkeypatch.delenv("SSL_CERT_FILE")
    # Debian's bundle does not hold the test CA: refused.
    assert await _code(auth.dial(tls_server.addr, certs.reader, tls=tls)) == grpc.StatusCode.UNAVAILABLE
