"""The `conveyor` command group: global options, then one command per task."""

from __future__ import annotations

import click

from conveyor.common import auth
from conveyor.common.cli import admin, jobs, keys, schedules, tokens
from conveyor.common.cli.context import Settings
from conveyor.common.tls import ClientTLS, TLSConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--producer",
    envvar="CONVEYOR_PRODUCER_ADDR",
    default="127.0.0.1:50051",
    show_default=True,
    help="ProducerService address (env CONVEYOR_PRODUCER_ADDR).",
)
@click.option(
    "--results",
    envvar="CONVEYOR_RESULTS_ADDR",
    default="127.0.0.1:50052",
    show_default=True,
    help="ResultsService address, for history (env CONVEYOR_RESULTS_ADDR).",
)
@click.option(
    "--token",
    envvar="CONVEYOR_TOKEN",
    default="",
    show_default=False,
    help="Bearer token, when the servers check tokens (env CONVEYOR_TOKEN, or a file named by CONVEYOR_TOKEN_FILE).",
)
@click.option(
    "--tls",
    "tls_on",
    is_flag=True,
    envvar="CONVEYOR_TLS",
    help="Dial with TLS, trusting the system's CA certificates (env CONVEYOR_TLS=1). "
    "Implied by --cacert, --cert and --servername.",
)
@click.option(
    "--cacert",
    envvar="CONVEYOR_TLS_CA_FILE",
    default="",
    metavar="FILE",
    help="CA certificate(s) that sign the servers' certificates, PEM (env CONVEYOR_TLS_CA_FILE).",
)
@click.option(
    "--cert",
    envvar="CONVEYOR_TLS_CLIENT_CERT_FILE",
    default="",
    metavar="FILE",
    help="Client certificate, PEM, for servers that require one (mTLS; env CONVEYOR_TLS_CLIENT_CERT_FILE).",
)
@click.option(
    "--key",
    envvar="CONVEYOR_TLS_CLIENT_KEY_FILE",
    default="",
    metavar="FILE",
    help="The client certificate's private key, PEM (env CONVEYOR_TLS_CLIENT_KEY_FILE).",
)
@click.option(
    "--servername",
    envvar="CONVEYOR_TLS_SERVER_NAME",
    default="",
    metavar="NAME",
    help="The name the servers' certificates carry, when the address does not (env CONVEYOR_TLS_SERVER_NAME).",
)
@click.option("--json", "json_", is_flag=True, help="Print JSON for scripts (also accepted after the command).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds each call may take.")
@click.version_option(package_name="conveyor-common", prog_name="conveyor")
@click.pass_context
def cli(
    ctx: click.Context,
    producer: str,
    results: str,
    token: str,
    tls_on: bool,
    cacert: str,
    cert: str,
    key: str,
    servername: str,
    json_: bool,
    timeout: float,
) -> None:
    """Enqueue, watch and manage Conveyor jobs from a terminal.

    Exit codes: 0 done (watch: the job succeeded), 1 the service said no or could not be
    reached, 2 bad usage, 3 the job failed, 4 dead-lettered, 5 cancelled, 130 Ctrl-C.
    """
    if not token:
        try:
            token = auth.presented_token()
        except auth.TokenFileError as exc:
            raise click.UsageError(str(exc)) from None
    try:
        tls = ClientTLS.create(
            tls=tls_on,
            ca_file=cacert,
            cert_file=cert,
            key_file=key,
            server_name=servername,
            ca_var="--cacert",
            cert_var="--cert",
            key_var="--key",
        )
    except TLSConfigError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.obj = Settings(producer=producer, results=results, json=json_, timeout=timeout, token=token, tls=tls)
    if ctx.invoked_subcommand != "key":
        # Opens what a server without the key answered sealed (ADR 0025); `key` reports its own errors.
        keys.configure_or_exit()


for command in (
    jobs.enqueue,
    jobs.watch,
    jobs.get,
    jobs.events,
    jobs.list_jobs,
    jobs.cancel,
    admin.stats,
    admin.queues,
    admin.workers,
    admin.pause,
    admin.resume,
    admin.limits,
    admin.dlq,
    schedules.schedules,
    tokens.token,
    tokens.whoami,
    keys.key,
    keys.reencrypt,
):
    cli.add_command(command)


def main() -> None:
    """The console script."""
    cli(prog_name="conveyor")
