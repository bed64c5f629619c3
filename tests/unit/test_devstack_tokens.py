"""`make up`'s tokens: made once, kept across runs, remade when one is lost; digests only on disk."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from conveyor.common.auth import Role, TokenFile, digest_of
from conveyor.common.cli.app import cli
from conveyor.common.devstack.tokens import ensure_dashboard_secret, ensure_dev_tokens
from conveyor.dashboard.login import LoginSettings


def test_tokens_are_made_once_and_kept(tmp_path: Path) -> None:
    first = ensure_dev_tokens(tmp_path)
    again = ensure_dev_tokens(tmp_path)
    assert again == first
    assert first.admin != first.services
    assert first.admin_path.read_text().strip() == first.admin
    text = first.file.read_text()
    assert first.admin not in text and first.services not in text
    roles = {t.name: t.role for t in TokenFile(first.file).tokens()}
    assert roles == {"make-up-admin": Role.ADMIN, "make-up-services": Role.READER}
    for path in (first.file, first.admin_path, tmp_path / "services.token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_lost_token_file_makes_new_tokens(tmp_path: Path) -> None:
    first = ensure_dev_tokens(tmp_path)
    first.file.unlink()
    second = ensure_dev_tokens(tmp_path)
    assert second.admin != first.admin
    assert {t.name for t in TokenFile(second.file).tokens()} == {"make-up-admin", "make-up-services"}


def test_an_admin_token_no_longer_admitted_is_replaced(tmp_path: Path) -> None:
    first = ensure_dev_tokens(tmp_path)
    first.admin_path.write_text("cvt_not-the-one\n")
    second = ensure_dev_tokens(tmp_path)
    assert second.admin not in ("cvt_not-the-one", first.admin)


def test_token_init_makes_a_deployments_starter_set_once(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    first = CliRunner().invoke(cli, ["token", "init", str(secrets), "--json"])
    assert first.exit_code == 0, first.output
    paths = json.loads(first.output)
    tokens = {t.name: t for t in TokenFile(Path(paths["tokens"])).tokens()}
    assert {n: t.role for n, t in tokens.items()} == {"conveyor-admin": Role.ADMIN, "conveyor-services": Role.READER}
    admin = Path(paths["admin"]).read_text().strip()
    assert tokens["conveyor-admin"].digest == digest_of(admin)
    dashboard = Path(paths["dashboard"]).read_text().strip()
    assert len(dashboard) >= 32
    again = CliRunner().invoke(cli, ["token", "init", str(secrets), "--json"])
    assert again.exit_code == 0 and Path(paths["admin"]).read_text().strip() == admin
    assert Path(paths["dashboard"]).read_text().strip() == dashboard


def test_the_dashboard_secret_is_made_once_kept_private_and_remade_when_too_short(tmp_path: Path) -> None:
    path = ensure_dashboard_secret(tmp_path)
    secret = path.read_text().strip()
    assert len(secret) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_dashboard_secret(tmp_path).read_text().strip() == secret  # kept: nobody is signed out
    path.write_text("short\n")
    remade = ensure_dashboard_secret(tmp_path).read_text().strip()
    assert len(remade) >= 32 and remade != secret
    # It is what the dashboard's settings accept.
    login = LoginSettings.from_env({"CONVEYOR_DASHBOARD_LOGIN": "1", "CONVEYOR_DASHBOARD_SECRET_FILE": str(path)})
    assert login is not None and login.secret == remade.encode()
