"""Users and API keys: who is calling, and which concept store is theirs.

`plvmctl serve add-user NAME` makes a key `plvm-<key id>-<secret>`, prints it once and keeps
only its scrypt hash (hashlib.scrypt, stdlib) in the users file, a JSON file written
atomically under a lock. The key id picks the one record to check, so a request costs one
scrypt at most; a key once verified is remembered in memory by its SHA-256 until the file
changes (a new user or a replaced key is seen on the next request, without a restart).

Each user's concepts are a store of their own, `STORES/NAME`; nothing a request says names a
folder, so no request reaches another user's store. Without a users file the server has one
local user whose store is the command line's own (`--store` or the recipe's).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..concept import NAME_PATTERN
from ..errors import PlvmError
from ..fileio import write_json_atomic
from ..locks import hold
from ..store import ConceptStore

FORMAT_NAME = "plvmctl.users"
KEY_PREFIX = "plvm-"
LOCAL_USER = "local"
# scrypt's cost: 16 MiB and tens of milliseconds per check (OWASP's minimum is N=2^17 with
# r=8 for passwords; a key has 190 random bits, so guessing it is hopeless whatever N is).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


@dataclass(frozen=True)
class Caller:
    """The user a request comes from, and their concept store."""

    name: str
    store: ConceptStore


def hash_key(key: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$SALT$HASH` (hex) of `key`."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def key_matches(key: str, stored: str) -> bool:
    """Whether `key` hashes to `stored` (compared in constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(key.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                                  dklen=len(bytes.fromhex(digest)))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(computed.hex(), digest)


def _key_id(key: str) -> str | None:
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, _, secret = key[len(KEY_PREFIX):].partition("-")
    return key_id if key_id and secret else None


def check_user_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise PlvmError(f"invalid user name {name!r}: use 1-64 letters, digits, '-' or '_'")
    return name


def read_users(path: Path) -> dict[str, dict]:
    """name → {key_id, key_hash, created} from the users file; PlvmError if it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlvmError(f"users file not found: {path} (make one: plvmctl serve add-user NAME --users {path})") from None
    except (OSError, ValueError) as error:
        raise PlvmError(f"unreadable users file {path}: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("users"), dict):
        raise PlvmError(f"{path} is not a plvmctl users file")
    return data["users"]


def add_user(path: str | os.PathLike, name: str, replace: bool = False) -> str:
    """Add user `name` (or give them a new key, with `replace`) to the users file; the new key.

    The file holds only the key's hash: the returned key is shown once and never again."""
    path = Path(path)
    check_user_name(name)
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(24)}"
    with hold(path.with_name(path.name + ".lock"), f"users file {path}", wait=True):
        users = read_users(path) if path.exists() else {}
        if name in users and not replace:
            raise PlvmError(f"user {name!r} already exists in {path} (--replace gives them a new key)")
        users[name] = {"key_id": key_id, "key_hash": hash_key(key),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(path, {"format": FORMAT_NAME, "version": 1, "users": users}, mode=0o600)
    return key


class LocalUser:
    """No users file: every request is the one local user's, whatever key it carries."""

    keyed = False

    def __init__(self, store: ConceptStore):
        self.caller = Caller(LOCAL_USER, store)

    def authenticate(self, key: str | None) -> Caller | None:
        return self.caller


class KeyedUsers:
    """The users of a users file, each with the store `stores/NAME`."""

    keyed = True

    def __init__(self, path: str | os.PathLike, stores: str | os.PathLike):
        self.path = Path(path)
        self.stores = Path(stores)
        self._lock = threading.Lock()
        self._stamp = None
        self._by_key_id: dict[str, tuple[str, str]] = {}
        self._verified: dict[str, str] = {}  # sha256 of a checked key → user name
        self._reload()
        if not self._by_key_id:
            raise PlvmError(f"{self.path} has no users (add one: plvmctl serve add-user NAME --users {self.path})")

    def _reload(self) -> None:
        """Read the file again if it changed since last read (a user added or a key replaced)."""
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        users = read_users(self.path)
        self._by_key_id = {record["key_id"]: (check_user_name(name), record["key_hash"])
                           for name, record in users.items()}
        self._verified.clear()
        self._stamp = stamp

    def authenticate(self, key: str | None) -> Caller | None:
        """The caller whose key this is, or None."""
        if not key:
            return None
        fingerprint = hashlib.sha256(key.encode()).hexdigest()
        with self._lock:
            try:
                self._reload()
            except (OSError, PlvmError):
                pass  # a file being replaced or broken: keep serving the users last read
            name = self._verified.get(fingerprint)
            record = self._by_key_id.get(_key_id(key) or "")
        if name is None:
            if record is None or not key_matches(key, record[1]):
                return None
            name = record[0]
            with self._lock:
                self._verified[fingerprint] = name
        return Caller(name, ConceptStore(self.stores / name))
