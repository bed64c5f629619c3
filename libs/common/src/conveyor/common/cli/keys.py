"""`conveyor key new|check` and `conveyor reencrypt QUEUE`: the encryption keyring (ADR 0025)."""

from __future__ import annotations

import json
import os

import click

from conveyor.common import crypto
from conveyor.common.cli import output
from conveyor.common.cli.context import Settings, command

#: A keyring that cannot be used (sysexits' EX_CONFIG, as the services exit).
EXIT_BAD_KEYRING = 78


def configure_or_exit() -> None:
    """Load this process's keyring from the environment, or exit 78 saying what is wrong."""
    try:
        crypto.configure_from_env()
    except crypto.KeyringError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_BAD_KEYRING) from None


@click.group("key")
def key() -> None:
    """Encryption keys for encrypted queues (CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING)."""


@key.command("new")
@click.option("--id", "key_id", default="", help="The key id (default: k + 8 random hex digits).")
def new(key_id: str) -> None:
    """Print a new keyring entry KEY_ID:BASE64_KEY (32 random bytes for AES-256-GCM).

    The first entry of a keyring is the active key. To rotate, put the new entry first, keep
    the old ones after it, restart the services, run `conveyor reencrypt QUEUE` for each
    encrypted queue, then remove the old entry:

        { conveyor key new; cat keyring; } > keyring.new && mv keyring.new keyring
    """
    try:
        click.echo(crypto.new_key_entry(key_id))
    except crypto.KeyringError as exc:
        raise click.BadParameter(str(exc), param_hint="--id") from None


@key.command("check")
@click.option("--json", "json_", is_flag=True, help="Print JSON for scripts.")
def check(json_: bool) -> None:
    """Check the keyring and encrypted queues in the environment (exit 78 when they are unusable).

    Prints the active key id, every key id, and which queues are encrypted; never a key.
    """
    try:
        encryption = crypto.Encryption.from_env()
    except crypto.KeyringError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_BAD_KEYRING) from None
    keyring = encryption.keyring
    if keyring is not None:
        # Each key seals and opens (what the services will do with it), so a check that passes means usable keys.
        for key_id in keyring.key_ids:
            probe = crypto.Keyring(active=key_id, keys=keyring.keys)
            if probe.open(probe.seal(b"{}", crypto.PAYLOAD, "check/0"), crypto.PAYLOAD, "check/0") != b"{}":
                click.echo(f"error: key {key_id!r} does not open what it seals", err=True)
                raise SystemExit(EXIT_BAD_KEYRING)
    source = (
        f"CONVEYOR_KEYRING_FILE={os.environ['CONVEYOR_KEYRING_FILE']}"
        if os.environ.get("CONVEYOR_KEYRING_FILE")
        else "CONVEYOR_KEYRING"
        if keyring is not None
        else ""
    )
    found = {
        "source": source,
        "active": keyring.active if keyring else "",
        "keys": list(keyring.key_ids) if keyring else [],
        "encrypted_queues": sorted(encryption.queues),
    }
    if json_:
        click.echo(json.dumps(found))
        return
    if keyring is None:
        click.echo("no keyring: set CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING (`conveyor key new` prints a key)")
        return
    click.echo(f"keyring: {source}")
    click.echo(f"active key: {keyring.active}")
    click.echo(f"keys: {', '.join(keyring.key_ids)}")
    queues = "every queue" if encryption.all_queues else ", ".join(sorted(encryption.queues)) or "none"
    click.echo(f"encrypted queues: {queues}")


@click.command("reencrypt")
@click.argument("queue")
@click.option("--batch", type=click.IntRange(1, 10_000), default=1000, show_default=True, help="Jobs per call.")
@command
async def reencrypt(settings: Settings, queue: str, batch: int) -> int:
    """Seal QUEUE's stored jobs again with the active key: PostgreSQL (results), parked jobs in Redis (producer).

    Run it after putting a new key first in the keyring of every service (and restarting
    them). It also counts what Redis still holds under other keys (stream entries cannot be
    rewritten: waiting jobs run, dead letters are retried or purged, events pass
    CONVEYOR_RETENTION_SECONDS); once nothing is unreadable and Redis holds nothing under the
    old key, run it once more and remove the old key. Also seals what is stored in clear when the queue was
    encrypted after it had jobs. Safe to run again. Admin token.
    """
    async with settings.client() as client:
        in_redis = await client.reencrypt_redis(queue)
        after, key_id = "", ""
        examined = jobs = events = 0
        unreadable: list[str] = []
        while True:
            done = await client.reencrypt_jobs(queue, after, batch)
            key_id = done.key_id
            examined += done.examined
            jobs += done.jobs_reencrypted
            events += done.events_reencrypted
            unreadable.extend(done.unreadable)
            after = done.next_after_job_id
            if not after:
                break
    remaining = [(r.place, r.key_id, r.count) for r in in_redis.remaining]
    if settings.json:
        output.print_json(
            {
                "queue": queue,
                "key_id": key_id,
                "examined": examined,
                "jobs_reencrypted": jobs,
                "events_reencrypted": events,
                "unreadable": unreadable,
                "redis": {
                    "key_id": in_redis.key_id,
                    "parked_reencrypted": in_redis.parked_reencrypted,
                    "remaining": [{"place": p, "key_id": k, "count": n} for p, k, n in remaining],
                },
            }
        )
    else:
        click.echo(
            f"{queue}: PostgreSQL: {examined} jobs examined, {jobs} jobs and {events} events sealed again "
            f"with key {key_id}; Redis: {in_redis.parked_reencrypted} parked jobs sealed again with key "
            f"{in_redis.key_id}"
        )
        if remaining:
            click.echo(
                "still in Redis under other keys (they leave as jobs run, dead letters are retried or purged, "
                "and events pass the retention): " + ", ".join(f"{n} {p} ({k})" for p, k, n in remaining)
            )
        else:
            click.echo("Redis holds nothing sealed with another key")
        if unreadable:
            click.echo(
                f"{len(unreadable)} jobs hold a value no key of the results service opens (keep their key): "
                + ", ".join(unreadable[:10]),
                err=True,
            )
    return 1 if unreadable else 0
