"""`conveyor token new` makes a bearer token and the token-file entry that admits it;
`conveyor token init` makes a deployment's starter set of token files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from conveyor.common import auth
from conveyor.common.cli import output
from conveyor.common.cli.context import OK, Settings, command
from conveyor.common.devstack.tokens import ensure_dashboard_secret, ensure_dev_tokens
from conveyor.v1 import admin_service_pb2


@click.group("token")
def token() -> None:
    """Bearer tokens for servers with CONVEYOR_AUTH_TOKENS_FILE set."""


@token.command("new")
@click.option("--name", required=True, help="Who holds it (shown in the servers' logs as `caller`).")
@click.option(
    "--role",
    type=click.Choice([r.value for r in auth.Role]),
    required=True,
    help="producer: enqueue and watch; reader: get, list, watch, stats; admin: everything.",
)
@click.option("--queue", "queues", multiple=True, help="Limit the token to this queue (repeatable).")
@click.option("--json", "json_", is_flag=True, help="Print {token, entry} as JSON.")
def new(name: str, role: str, queues: tuple[str, ...], json_: bool) -> None:
    """Print a new token on standard output and its file entry on standard error.

    Append the entry to the token file (servers re-read it within a second); give the token
    to its holder. The file keeps only the token's SHA-256, so a lost token cannot be read
    back from it: make a new one.

        conveyor token new --name billing --role producer 2>>tokens.toml
    """
    secret = auth.new_token()
    entry = auth.entry_for(secret, name, auth.Role(role), queues)
    if json_:
        click.echo(json.dumps({"token": secret, "entry": entry}))
        return
    click.echo(entry, err=True, nl=False)
    click.echo(secret)


@token.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--prefix", default="conveyor", show_default=True, help="The entries' names: PREFIX-admin, PREFIX-services."
)
@click.option("--json", "json_", is_flag=True, help="Print the four paths as JSON.")
def init(directory: Path, prefix: str, json_: bool) -> None:
    """Make a starter set of token files in DIRECTORY (kept if it is already there).

    tokens.toml (the digests, for CONVEYOR_AUTH_TOKENS_FILE), admin.token (an admin token for
    the people who operate Conveyor), services.token (a reader, for the producer's calls to the
    results service) and dashboard.secret (signs the dashboard's sign-in cookies,
    CONVEYOR_DASHBOARD_SECRET_FILE), each readable by its owner only. Mount them as secrets:

        conveyor token init deploy/secrets
    """
    made = ensure_dev_tokens(directory, prefix=prefix)
    paths = {
        "tokens": str(made.file),
        "admin": str(made.admin_path),
        "services": str(directory / "services.token"),
        "dashboard": str(ensure_dashboard_secret(directory)),
    }
    if json_:
        click.echo(json.dumps(paths))
        return
    for what, path in paths.items():
        click.echo(f"{what:9} {path}")


@click.command("whoami")
@command
async def whoami(settings: Settings) -> int:
    """Who the servers take you for: your token's name, role and queues (WhoAmI)."""
    async with settings.client() as client:
        me = await client.who_am_i()
    role = admin_service_pb2.Role.Name(me.role).removeprefix("ROLE_").lower()
    if settings.json:
        output.print_json(me)
    elif not me.authentication:
        output.out.print("the producer checks no tokens: every caller may call everything (admin)")
    else:
        queues = ", ".join(me.queues) if me.queues else "every queue"
        output.out.print(f"{me.name}: role {role}, {queues}")
    return OK
