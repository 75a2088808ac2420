"""Integrity data for files this user's deepinsert wrote: HMAC-SHA256 under a local key.

``model.zip`` and the checkpoints of a run folder are SB3 zips, and loading one unpickles
it, which can run code. ``train --resume`` is the one path that needs them, so every such
file is signed when written (``integrity.json`` in the run folder: relative path -> HMAC of
its bytes) with a key that never leaves this machine (``$DEEPINSERT_RUN_KEY`` names the key
file; default ``$XDG_CONFIG_HOME/deepinsert/run.key``, created 0600 on first use). A file
whose HMAC does not match (changed since it was written, cut short by a crash, or written
by someone else, whose key differs) is not unpickled unless the caller says it trusts the
folder (``--trust-run``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from deepinsert.utils.atomic import atomic_write_json

MANIFEST = "integrity.json"
SCHEME = "hmac-sha256/v1"


def key_path() -> Path:
    """Where the local signing key lives (see the module docstring)."""
    env = os.environ.get("DEEPINSERT_RUN_KEY")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "deepinsert" / "run.key"


def _key() -> bytes:
    path = key_path()
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: two processes creating it at once agree on the first one's key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def file_mac(path: str | os.PathLike[str]) -> str:
    """HMAC-SHA256 (hex) of the file's bytes under the local key."""
    mac = hmac.new(_key(), digestmod=hashlib.sha256)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def _read(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("scheme") != SCHEME or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(k, str) and isinstance(v, str)}


def sign(folder: str | os.PathLike[str], rel: str, source: str | os.PathLike[str] | None = None) -> None:
    """Record the HMAC of ``folder/rel`` (computed from ``source`` if given: a temporary
    file about to be renamed onto ``rel``, so the record exists before the file does)."""
    folder = Path(folder)
    files = _read(folder)
    files[rel] = file_mac(source if source is not None else folder / rel)
    atomic_write_json(folder / MANIFEST, {"scheme": SCHEME, "files": dict(sorted(files.items()))})


def verify(folder: str | os.PathLike[str], rel: str) -> bool:
    """True when ``folder/rel`` exists and matches its recorded HMAC."""
    folder = Path(folder)
    expected = _read(folder).get(rel)
    path = folder / rel
    if expected is None or not path.is_file():
        return False
    return hmac.compare_digest(expected, file_mac(path))
