"""The dev stack's tokens: `make up` checks tokens as production does.

Two tokens, made once and kept in the data directory so that a command pasted yesterday still
works today: ``admin.token`` for the person at the terminal (the CLI, grpcurl, buf curl and the
dashboard present it), and ``services.token``, a reader, for the producer's calls to the results
service. ``tokens.toml`` holds only their digests, as any token file does. ``dashboard.secret``
signs the dashboard's sign-in cookies (CONVEYOR_DASHBOARD_SECRET_FILE): kept too, so a restart of
`make up` does not sign everybody out.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from conveyor.common.auth import Role, TokenFileError, digest_of, entry_for, new_token, parse_tokens


@dataclass(frozen=True)
class DevTokens:
    #: The token file the producer and the results service check (CONVEYOR_AUTH_TOKENS_FILE).
    file: Path
    #: Where the admin token is kept: `export CONVEYOR_TOKEN=$(cat <admin_path>)`.
    admin_path: Path
    admin: str
    services: str


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def _kept(data_dir: Path) -> DevTokens | None:
    """The tokens an earlier `make up` made, if they are all there and still admitted."""
    file, admin_path, services_path = (data_dir / n for n in ("tokens.toml", "admin.token", "services.token"))
    try:
        admin = admin_path.read_text().strip()
        services = services_path.read_text().strip()
        admitted = {t.digest for t in parse_tokens(file.read_text(), str(file))}
    except (OSError, TokenFileError):
        return None
    if digest_of(admin) not in admitted or digest_of(services) not in admitted:
        return None
    return DevTokens(file, admin_path, admin, services)


def ensure_dev_tokens(data_dir: Path, prefix: str = "make-up") -> DevTokens:
    """The dev stack's tokens under ``data_dir``: the kept ones, or new ones when any is missing.

    `conveyor token init DIR` makes the same starter set for a deployment (compose secrets, a
    Kubernetes Secret), with its entries named ``<prefix>-admin`` and ``<prefix>-services``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    kept = _kept(data_dir)
    if kept is not None:
        return kept
    admin, services = new_token(), new_token()
    admin_path = data_dir / "admin.token"
    _write_private(admin_path, admin + "\n")
    _write_private(data_dir / "services.token", services + "\n")
    file = data_dir / "tokens.toml"
    entries = (
        entry_for(admin, f"{prefix}-admin", Role.ADMIN) + "\n" + entry_for(services, f"{prefix}-services", Role.READER)
    )
    _write_private(file, entries)
    return DevTokens(file, admin_path, admin, services)


def ensure_dashboard_secret(data_dir: Path) -> Path:
    """The file holding the dev dashboard's cookie-signing secret: the kept one, or a new one (256 bits)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "dashboard.secret"
    try:
        if len(path.read_text().strip()) >= 32:
            return path
    except OSError:
        pass
    _write_private(path, secrets.token_urlsafe(32) + "\n")
    return path
