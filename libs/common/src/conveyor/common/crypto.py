"""Payload and result encryption at rest, per queue, opt-in (ADR 0025).

AES-256-GCM (``cryptography``'s AESGCM). A sealed value is itself JSON text: a JSON string

    "$conveyor-sealed:v1:<key id>:<base64url(nonce 12 B || ciphertext || tag 16 B)>"

so it travels unchanged wherever the plaintext JSON travelled: the payload of a stored Job
in the job streams, the parked hash and the dead letters, the result of a SUCCEEDED event,
and the ``payload``/``result`` jsonb columns in PostgreSQL (as a jsonb string). The
additional authenticated data binds the format, the key id, what the value is (``payload``
or ``result``) and the job id, so a ciphertext moved to another job, or from a payload to a
result, does not decrypt.

Keyring (``CONVEYOR_KEYRING_FILE`` names a file, or ``CONVEYOR_KEYRING`` holds the text):
entries ``KEY_ID:BASE64_KEY`` (32 random bytes, ``conveyor key new`` prints one), separated by
commas or new lines, ``#`` starts a comment. **The first entry is the active key**: it seals
everything new; the others only open what they sealed. Rotation: put a new entry first,
restart, run ``conveyor reencrypt QUEUE`` for each encrypted queue, then drop the old entry.

``CONVEYOR_ENCRYPTED_QUEUES``: a comma list of queues, or ``*`` for all. Only processes
that hold the keyring can seal or open; a bad keyring stops a service at start with exit 78.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: What a sealed value (as text, without the JSON quotes) starts with: the format header.
PREFIX = "$conveyor-sealed:v1:"
_QUOTED_PREFIX = b'"' + PREFIX.encode()
#: Any version of the format (a reader that meets a newer one says so instead of showing it as data).
SEALED_JSON = _ANY_VERSION = b'"$conveyor-sealed:'
PAYLOAD = "payload"
RESULT = "result"
#: A schedule's job template (its payload), bound to "schedule/<schedule id>".
TEMPLATE = "template"
_NONCE = 12
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_ALL = "*"


class KeyringError(ValueError):
    """The keyring (file or variable) cannot be used; the message says what to fix (exit 78)."""


class SealError(ValueError):
    """A sealed value cannot be opened: unknown key id, damaged, or sealed for another job or field."""

    def __init__(self, message: str, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


def new_key_entry(key_id: str = "") -> str:
    """A fresh keyring entry ``KEY_ID:BASE64_KEY`` (the id defaults to ``k`` + a random suffix)."""
    key_id = key_id or f"k{secrets.token_hex(4)}"
    if not _KEY_ID_RE.match(key_id):
        raise KeyringError(f"key id {key_id!r}: use 1-40 letters, digits, '_', '-' or '.'")
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def _aad(kind: str, job_id: str, key_id: str) -> bytes:
    return f"{PREFIX}{key_id}|{kind}|{job_id}".encode()


def is_sealed(data: bytes | str) -> bool:
    """Whether JSON text ``data`` is a sealed value (of any format version)."""
    raw = data.encode() if isinstance(data, str) else data
    return raw.startswith(_ANY_VERSION)


def key_id_of(data: bytes | str) -> str:
    """The key id of a sealed value (JSON text or the bare token), or "" if it is not one."""
    text = data.decode() if isinstance(data, bytes) else data
    text = text.removeprefix('"')
    if not text.startswith(PREFIX):
        return ""
    return text[len(PREFIX) :].split(":", 1)[0]


@dataclass(frozen=True)
class Keyring:
    """Keys by id, and which one seals."""

    active: str
    keys: Mapping[str, AESGCM] = field(repr=False)

    @classmethod
    def parse(cls, text: str, source: str = "CONVEYOR_KEYRING") -> Keyring:
        """A keyring from its text form (see the module's docstring).

        Raises:
            KeyringError: Empty, a malformed entry, a key that is not 32 bytes of base64, a repeated id.
        """
        entries: list[tuple[str, bytes]] = []
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        for number, part in enumerate(p.strip() for line in lines for p in line.split(",")):
            if not part:
                continue
            key_id, sep, encoded = part.partition(":")
            key_id, encoded = key_id.strip(), encoded.strip()
            where = f"{source}: entry {number + 1}"
            if not sep or not _KEY_ID_RE.match(key_id):
                raise KeyringError(
                    f"{where} is not KEY_ID:BASE64_KEY (key ids are 1-40 letters, digits, '_', '-', '.'); "
                    "`conveyor key new` prints a valid entry"
                )
            try:
                standard = encoded.replace("-", "+").replace("_", "/")
                key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(f"{where} (key id {key_id!r}): the key is not base64") from None
            if len(key) != 32:
                raise KeyringError(
                    f"{where} (key id {key_id!r}): the key is {len(key)} bytes; AES-256 needs 32 "
                    "(`conveyor key new` prints one)"
                )
            if any(key_id == seen for seen, _ in entries):
                raise KeyringError(f"{where}: key id {key_id!r} appears twice")
            entries.append((key_id, key))
        if not entries:
            raise KeyringError(f"{source} holds no key: add KEY_ID:BASE64_KEY (`conveyor key new` prints one)")
        return cls(active=entries[0][0], keys={key_id: AESGCM(key) for key_id, key in entries})

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self.keys)

    def seal(self, plaintext: bytes, kind: str, job_id: str) -> bytes:
        """``plaintext`` (JSON bytes) sealed with the active key, as JSON text of a string."""
        nonce = os.urandom(_NONCE)
        sealed = self.keys[self.active].encrypt(nonce, plaintext, _aad(kind, job_id, self.active))
        return b"".join(
            (_QUOTED_PREFIX, self.active.encode(), b":", base64.urlsafe_b64encode(nonce + sealed).rstrip(b"="), b'"')
        )

    def open(self, data: bytes | str, kind: str, job_id: str) -> bytes:
        """The plaintext JSON bytes of a sealed value (JSON text, quotes included or not).

        Raises:
            SealError: Not a value of this format, a key id this keyring lacks, or a value that
                was changed or sealed for another job or field.
        """
        text = data.decode() if isinstance(data, bytes) else data
        text = text.strip()
        if text.startswith('"') and text.endswith('"'):
            text = text[1:-1]
        if not text.startswith(PREFIX):
            raise SealError(f"not a sealed value of format v1 (starts {text[:20]!r})")
        key_id, sep, encoded = text[len(PREFIX) :].partition(":")
        if not sep:
            raise SealError("a sealed value without its key id")
        aes = self.keys.get(key_id)
        if aes is None:
            raise SealError(
                f"sealed with key id {key_id!r}, which the keyring does not hold (it holds {', '.join(self.keys)})",
                key_id,
            )
        try:
            raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            return aes.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(kind, job_id, key_id))
        except (binascii.Error, ValueError, InvalidTag):
            raise SealError(
                f"the {kind} of job {job_id} (key id {key_id!r}) does not decrypt: it was changed, "
                f"or sealed for another job or field",
                key_id,
            ) from None


@dataclass(frozen=True)
class Encryption:
    """A process's keyring and the queues it encrypts."""

    keyring: Keyring | None
    #: Queue names, or ("*",) for every queue.
    queues: frozenset[str] = frozenset()

    def encrypts(self, queue: str) -> bool:
        """Whether new payloads and results of ``queue`` are sealed."""
        return bool(self.queues) and (_ALL in self.queues or queue in self.queues)

    @property
    def all_queues(self) -> bool:
        return _ALL in self.queues

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Encryption:
        """From CONVEYOR_KEYRING_FILE / CONVEYOR_KEYRING and CONVEYOR_ENCRYPTED_QUEUES.

        Raises:
            KeyringError: The file cannot be read, the keyring is malformed, both variables are
                set, or queues are named as encrypted without a keyring.
        """
        env = os.environ if env is None else env
        path = env.get("CONVEYOR_KEYRING_FILE", "").strip()
        inline = env.get("CONVEYOR_KEYRING", "").strip()
        if path and inline:
            raise KeyringError("set CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING, not both")
        keyring: Keyring | None = None
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise KeyringError(f"CONVEYOR_KEYRING_FILE={path!r}: cannot read it ({exc.strerror})") from None
            keyring = Keyring.parse(text, f"CONVEYOR_KEYRING_FILE {path}")
        elif inline:
            keyring = Keyring.parse(inline)
        queues = frozenset(q.strip() for q in env.get("CONVEYOR_ENCRYPTED_QUEUES", "").split(",") if q.strip())
        if queues and keyring is None:
            raise KeyringError(
                "CONVEYOR_ENCRYPTED_QUEUES names queues to encrypt but there is no keyring: "
                "set CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING (`conveyor key new` prints a key)"
            )
        if _ALL in queues and len(queues) > 1:
            raise KeyringError("CONVEYOR_ENCRYPTED_QUEUES: '*' means every queue; name no others beside it")
        return cls(keyring, queues)


_current = Encryption(None)


def configure(encryption: Encryption) -> None:
    """Make ``encryption`` this process's (services call it once at start; tests set and reset it)."""
    global _current
    _current = encryption


def configure_from_env(env: Mapping[str, str] | None = None) -> Encryption:
    """Read the keyring from the environment and make it this process's; KeyringError if it is bad."""
    encryption = Encryption.from_env(env)
    configure(encryption)
    return encryption


def current() -> Encryption:
    """This process's keyring and encrypted queues (no keyring, no queues unless configured)."""
    return _current


def seal_if_encrypted(queue: str, plaintext: bytes, kind: str, job_id: str) -> bytes:
    """``plaintext`` sealed when ``queue`` is encrypted, else unchanged."""
    encryption = _current
    if encryption.keyring is None or not encryption.encrypts(queue):
        return plaintext
    return encryption.keyring.seal(plaintext, kind, job_id)


def open_if_sealed(data: bytes, kind: str, job_id: str) -> bytes:
    """The plaintext of ``data`` if it is sealed (SealError if it cannot be opened here), else ``data``."""
    if not data.startswith(_ANY_VERSION):
        return data
    keyring = _current.keyring
    if keyring is None:
        raise SealError(
            f"the {kind} of job {job_id} is encrypted (key id {key_id_of(data)!r}) and this process has no keyring: "
            "set CONVEYOR_KEYRING_FILE or CONVEYOR_KEYRING",
            key_id_of(data),
        )
    return keyring.open(data, kind, job_id)


def try_open(data: bytes, kind: str, job_id: str) -> bytes:
    """Like open_if_sealed, but a value that cannot be opened here stays sealed (for answers and views)."""
    try:
        return open_if_sealed(data, kind, job_id)
    except SealError:
        return data


def sealed_token(data: bytes | str) -> str:
    """The sealed value as text without its JSON quotes."""
    text = data.decode() if isinstance(data, bytes) else data
    return text.strip().strip('"')


#: The object key under which a payload that stays sealed is shown (a payload is always an object).
SEALED_KEY = "$sealed"
