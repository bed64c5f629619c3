"""Payload/result sealing (conveyor.common.crypto, ADR 0025): round trip, key ids, tampering, AAD, rotation."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.common import crypto
from conveyor.common.crypto import PAYLOAD, RESULT, Encryption, Keyring, KeyringError, SealError

JOB = "billing/01JD0000000000000000000000"
OTHER_JOB = "billing/01JD0000000000000000000001"
PLAIN = b'{"card":"4111-SECRET-MARKER","amount":42}'


@pytest.fixture
def old() -> str:
    return crypto.new_key_entry("old")


@pytest.fixture
def new() -> str:
    return crypto.new_key_entry("new")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    crypto.configure(Encryption(None))


def test_round_trip_is_json_text_carrying_format_and_key_id(old: str) -> None:
    ring = Keyring.parse(old)
    sealed = ring.seal(PLAIN, PAYLOAD, JOB)
    assert b"SECRET" not in sealed
    text = json.loads(sealed)  # a JSON string: stored as is in streams, events and jsonb
    assert text.startswith("$conveyor-sealed:v1:old:")
    assert crypto.is_sealed(sealed) and crypto.key_id_of(sealed) == "old"
    assert ring.open(sealed, PAYLOAD, JOB) == PLAIN
    assert ring.open(text, PAYLOAD, JOB) == PLAIN  # the bare token (as a client sees it) opens too
    # A fresh nonce every time: the same plaintext never seals to the same bytes.
    assert ring.seal(PLAIN, PAYLOAD, JOB) != sealed


def test_wrong_or_missing_key_id(old: str, new: str) -> None:
    sealed = Keyring.parse(old).seal(PLAIN, PAYLOAD, JOB)
    with pytest.raises(SealError, match="key id 'old', which the keyring does not hold") as err:
        Keyring.parse(new).open(sealed, PAYLOAD, JOB)
    assert err.value.key_id == "old"
    # Relabelled with a key id the keyring holds, it does not open with that key either.
    relabelled = sealed.replace(b":old:", b":new:")
    with pytest.raises(SealError, match="does not decrypt"):
        Keyring.parse(f"{new},{old}").open(relabelled, PAYLOAD, JOB)


def test_tampered_ciphertext_is_refused(old: str) -> None:
    ring = Keyring.parse(old)
    sealed = ring.seal(PLAIN, PAYLOAD, JOB).decode()
    body = sealed[len('"$conveyor-sealed:v1:old:') : -1]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raw[20] ^= 1
    tampered = '"$conveyor-sealed:v1:old:' + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=") + '"'
    with pytest.raises(SealError, match="does not decrypt"):
        ring.open(tampered, PAYLOAD, JOB)
    with pytest.raises(SealError):
        ring.open(sealed[:-10] + '"', PAYLOAD, JOB)  # truncated


def test_aad_binds_job_and_field(old: str) -> None:
    ring = Keyring.parse(old)
    sealed = ring.seal(PLAIN, PAYLOAD, JOB)
    with pytest.raises(SealError, match=f"job {OTHER_JOB}"):
        ring.open(sealed, PAYLOAD, OTHER_JOB)  # swapped onto another job
    with pytest.raises(SealError, match="the result"):
        ring.open(sealed, RESULT, JOB)  # a payload presented as a result


def test_rotation_old_keys_still_open_new_key_seals(old: str, new: str) -> None:
    before = Keyring.parse(old).seal(PLAIN, PAYLOAD, JOB)
    rotated = Keyring.parse(f"# rotated\n{new}\n{old}\n")
    assert rotated.active == "new" and rotated.key_ids == ("new", "old")
    after = rotated.seal(PLAIN, PAYLOAD, JOB)
    assert crypto.key_id_of(after) == "new"
    assert rotated.open(before, PAYLOAD, JOB) == PLAIN
    assert rotated.open(after, PAYLOAD, JOB) == PLAIN
    # Once everything is sealed again with "new", the old entry can go.
    assert Keyring.parse(new).open(after, PAYLOAD, JOB) == PLAIN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        ("nokey", "is not KEY_ID:BASE64_KEY"),
        ("bad id:" + base64.b64encode(b"k" * 32).decode(), "is not KEY_ID:BASE64_KEY"),
        ("k1:not base64!", "is not base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "the key is 5 bytes; AES-256 needs 32"),
        (
            "k1:" + base64.b64encode(b"a" * 32).decode() + ",k1:" + base64.b64encode(b"b" * 32).decode(),
            "appears twice",
        ),
    ],
)
def test_bad_keyrings_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message):
        Keyring.parse(text)


def test_keys_in_urlsafe_base64_without_padding() -> None:
    key = bytes(range(200, 232))
    ring = Keyring.parse("k:" + base64.urlsafe_b64encode(key).decode().rstrip("="))
    assert ring.open(ring.seal(b"{}", RESULT, JOB), RESULT, JOB) == b"{}"


def test_from_env(tmp_path: Path, old: str, new: str) -> None:
    path = tmp_path / "keyring"
    path.write_text(f"{new}\n{old}\n")
    enc = Encryption.from_env({"CONVEYOR_KEYRING_FILE": str(path), "CONVEYOR_ENCRYPTED_QUEUES": "billing, hr"})
    assert enc.keyring is not None and enc.keyring.active == "new"
    assert enc.encrypts("billing") and enc.encrypts("hr") and not enc.encrypts("emails")
    star = Encryption.from_env({"CONVEYOR_KEYRING": old, "CONVEYOR_ENCRYPTED_QUEUES": "*"})
    assert star.encrypts("anything") and star.all_queues
    assert not Encryption.from_env({}).encrypts("billing")
    with pytest.raises(KeyringError, match="not both"):
        Encryption.from_env({"CONVEYOR_KEYRING_FILE": str(path), "CONVEYOR_KEYRING": old})
    with pytest.raises(KeyringError, match="cannot read it"):
        Encryption.from_env({"CONVEYOR_KEYRING_FILE": str(tmp_path / "missing")})
    with pytest.raises(KeyringError, match="there is no keyring"):
        Encryption.from_env({"CONVEYOR_ENCRYPTED_QUEUES": "billing"})


def test_process_helpers(old: str) -> None:
    assert crypto.seal_if_encrypted("billing", PLAIN, PAYLOAD, JOB) == PLAIN  # nothing configured
    crypto.configure(Encryption(Keyring.parse(old), frozenset({"billing"})))
    sealed = crypto.seal_if_encrypted("billing", PLAIN, PAYLOAD, JOB)
    assert crypto.is_sealed(sealed)
    assert crypto.seal_if_encrypted("emails", PLAIN, PAYLOAD, JOB) == PLAIN
    assert crypto.open_if_sealed(sealed, PAYLOAD, JOB) == PLAIN
    assert crypto.open_if_sealed(PLAIN, PAYLOAD, JOB) == PLAIN
    crypto.configure(Encryption(None))
    with pytest.raises(SealError, match="this process has no keyring"):
        crypto.open_if_sealed(sealed, PAYLOAD, JOB)
    assert crypto.try_open(sealed, PAYLOAD, JOB) == sealed


@pytest.mark.parametrize("service", ["producer", "worker", "results", "dashboard"])
def test_bad_keyring_stops_a_service_with_exit_78(tmp_path: Path, service: str) -> None:
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "CONVEYOR_KEYRING": "k1:c2hvcnQ=", "CONVEYOR_GRPC_ADDR": "127.0.0.1:0"}
    out = subprocess.run(
        [sys.executable, "-m", f"conveyor.{service}"], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert out.returncode == 78, out.stderr
    assert "CONVEYOR_KEYRING: entry 1 (key id 'k1'): the key is" in out.stderr
    assert "Traceback" not in out.stderr


def test_answers_open_what_they_can_and_clients_open_the_rest(old: str) -> None:
    from conveyor.common import codec
    from conveyor.v1 import job_pb2

    ring = Keyring.parse(old)
    payload, result = ring.seal(PLAIN, PAYLOAD, JOB), ring.seal(b'{"ok":true}', RESULT, JOB)
    # A server without the key answers the sealed values...
    shown = codec.public_payload(payload, JOB)
    assert dict(shown) == {crypto.SEALED_KEY: crypto.sealed_token(payload)}
    job = job_pb2.Job(id=JOB)
    job.payload.CopyFrom(shown)
    job.result.CopyFrom(codec.public_result(result, JOB))
    assert job.result.string_value.startswith(crypto.PREFIX)
    assert codec.reveal_job(job).payload == shown  # ...and a client without it leaves them so.
    # A client holding the key opens them.
    crypto.configure(Encryption(ring))
    codec.reveal_job(job)
    assert job.payload["card"] == "4111-SECRET-MARKER" and job.payload["amount"] == 42
    assert job.result.struct_value["ok"] is True
    # A server holding the key answers in clear.
    assert codec.public_payload(payload, JOB)["amount"] == 42
    assert codec.public_result(result, JOB).struct_value["ok"] is True


def test_reencrypting_is_for_admins_only() -> None:
    from conveyor.common.auth import ACCESS

    assert ACCESS["/conveyor.v1.ResultsService/ReEncryptJobs"] == frozenset()
    assert ACCESS["/conveyor.v1.AdminService/ReEncrypt"] == frozenset()


def test_cli_key_new_and_check(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from conveyor.common.cli.app import cli

    runner = CliRunner()
    made = runner.invoke(cli, ["key", "new", "--id", "k9"], env={"CONVEYOR_KEYRING": ""})
    assert made.exit_code == 0
    entry = made.output.strip()
    assert Keyring.parse(entry).active == "k9"
    path = tmp_path / "keyring"
    path.write_text(entry + "\n" + crypto.new_key_entry("k8") + "\n")
    env = {"CONVEYOR_KEYRING_FILE": str(path), "CONVEYOR_ENCRYPTED_QUEUES": "vault"}
    checked = runner.invoke(cli, ["key", "check", "--json"], env=env)
    assert checked.exit_code == 0, checked.output
    found = json.loads(checked.output)
    assert found["active"] == "k9" and found["keys"] == ["k9", "k8"] and found["encrypted_queues"] == ["vault"]
    assert entry.split(":", 1)[1] not in checked.output  # never a key
    bad = runner.invoke(cli, ["key", "check"], env={"CONVEYOR_KEYRING": "k1:c2hvcnQ="})
    assert bad.exit_code == 78 and "AES-256 needs 32" in bad.output
    # Every other command loads the keyring first: a bad one stops it the same way, before any call.
    bad = runner.invoke(cli, ["get", "default/01JD0000000000000000000000"], env={"CONVEYOR_KEYRING": "k1:c2hvcnQ="})
    assert bad.exit_code == 78 and "CONVEYOR_KEYRING" in bad.output
