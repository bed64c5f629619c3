"""Redis and PostgreSQL serving TLS, with certificates from tests/support/certs.py.

``TlsRedis`` is a private redis-server listening on a TLS port only, requiring client certificates
(mTLS) and an ACL user with a password (the default user is off). ``tls_postgres`` starts a private
PostgreSQL with ``ssl=on``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from conveyor.common.devstack.servers import SYSTEM_PG_USER, PostgresServer, free_port
from tests.support.certs import CertificateAuthority

REDIS_USER = "conveyor"
REDIS_PASSWORD = "s3cret/pass"  # a character that needs quoting in a URL


@dataclass
class TlsFiles:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate, written to ``dir``."""

    dir: Path
    ca: CertificateAuthority
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path | None = None, owner: str | None = None) -> TlsFiles:
        """Certificates in ``directory`` (a fresh one under /tmp by default), owned by ``owner`` if given."""
        d = directory or Path(tempfile.mkdtemp(prefix="conveyor-tls-"))
        ca = CertificateAuthority()
        server_cert, server_key = ca.issue("localhost").write(d, "server")
        client_cert, client_key = ca.issue("conveyor-client", server=False).write(d, "client")
        files = cls(d, ca, ca.write(d), server_cert, server_key, client_cert, client_key)
        if owner is not None:
            user = pwd.getpwnam(owner)
            for path in (d, server_cert, server_key, files.ca_file):
                os.chown(path, user.pw_uid, user.pw_gid)
            d.chmod(0o755)
            for path in (client_cert, client_key):
                path.chmod(0o644)  # the tests' own processes read these
        return files


class TlsRedis:
    """redis-server on a TLS port only (client certificates required), with an ACL user and password."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="conveyor-tlsredis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, *, password: str = REDIS_PASSWORD, client_cert: bool = True) -> str:
        """A rediss:// URL with the ACL user, password, CA and client certificate as query parameters."""
        query = {"ssl_ca_certs": str(self.files.ca_file), "ssl_cert_reqs": "required", "ssl_check_hostname": "true"}
        if client_cert:
            query |= {"ssl_certfile": str(self.files.client_cert), "ssl_keyfile": str(self.files.client_key)}
        return f"rediss://{REDIS_USER}:{quote(password, safe='')}@127.0.0.1:{self.port}/0?{urlencode(query)}"

    def __enter__(self) -> TlsRedis:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server not installed"
        f = self.files
        self.proc = subprocess.Popen(
            [
                binary,
                "--bind", "127.0.0.1",
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(f.server_cert),
                "--tls-key-file", str(f.server_key),
                "--tls-ca-cert-file", str(f.ca_file),
                "--tls-auth-clients", "yes",
                "--save", "",
                "--appendonly", "no",
                "--maxmemory-policy", "noeviction",
                "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"),
                "--user", "default", "off",
                "--user", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~*", "&*", "+@all",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        context = ssl.create_default_context(cafile=str(f.ca_file))
        context.load_cert_chain(str(f.client_cert), str(f.client_key))
        deadline = time.monotonic() + 20
        while True:
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                    context.wrap_socket(raw, server_hostname="localhost") as s,
                ):
                    s.sendall(b"PING\r\n")
                    if s.recv(64):  # -NOAUTH: it answers
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"TLS redis-server did not start:\n{log}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def tls_postgres() -> Iterator[tuple[PostgresServer, TlsFiles]]:
    """A private PostgreSQL with ssl=on and a certificate for localhost and 127.0.0.1."""
    as_root = os.geteuid() == 0
    files = TlsFiles.make(owner=SYSTEM_PG_USER if as_root else None)
    settings = {
        "ssl": "on",
        "ssl_cert_file": str(files.server_cert),
        "ssl_key_file": str(files.server_key),
        "fsync": "off",
    }
    with PostgresServer(settings=settings) as server:
        yield server, files
    shutil.rmtree(files.dir, ignore_errors=True)
