"""Finding, verifying and downloading dataset files.

Policy:
- a registered file that exists is checked against its sha256 once; the result is remembered
  per process (keyed by path, size and mtime) and, where the folder is writable, in a small
  sidecar `.exvae_verified.json` beside it, so a later process does not hash it again. A
  changed file (new size or mtime) is hashed again. `verify_file(..., use_cache=False)`
  forces a fresh hash.
- a missing file is downloaded only when allowed: to a temporary name in the same folder,
  hashed, and renamed into place only if the hash matches (nothing half-written is ever
  visible under the real name).
- every failure names the file, the folder and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..common.atomic import atomic_path, write_text
from .sources import RemoteFile
from ..common.errors import KnownError

log = logging.getLogger(__name__)

# fetch(url, dest): write the body of `url` to the file `dest` (raise OSError on failure).
Fetch = Callable[[str, Path], None]

SIDECAR = ".exvae_verified.json"
_CHUNK = 1 << 20

# (absolute path, size, mtime_ns) -> sha256 hex of files already hashed in this process.
_verified: dict[tuple[str, int, int], str] = {}


class DataFileMissingError(KnownError, FileNotFoundError):
    """A dataset file is absent and could not be downloaded; the message says what to do."""


class ChecksumMismatchError(KnownError, ValueError):
    """A dataset file's sha256 differs from the registered one."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _read_sidecar(folder: Path) -> dict:
    try:
        return json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}


def writable_dir(folder: Path) -> bool:
    """True if we may add files to `folder`.

    Both the access check and the mode bits must allow it: root passes os.access on
    any folder, but a folder whose mode has no write bit (a shared, read-only data set)
    is meant to stay untouched.
    """
    try:
        mode = Path(folder).stat().st_mode
    except OSError:
        return False
    has_write_bit = bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return has_write_bit and os.access(folder, os.W_OK)


def _write_sidecar(folder: Path, name: str, key: tuple[str, int, int], digest: str) -> None:
    """Best effort: a read-only folder (a shared data set) simply gets no sidecar."""
    if not writable_dir(folder):
        return
    entries = _read_sidecar(folder)
    entries[name] = {"size": key[1], "mtime_ns": key[2], "sha256": digest}
    try:
        write_text(folder / SIDECAR, json.dumps(entries, indent=1, sort_keys=True))
    except OSError as err:  # concurrent writers or a full disk only cost a re-hash later
        log.debug("could not write %s: %s", folder / SIDECAR, err)


def verify_file(path: Path, expected_sha256: str, *, use_cache: bool = True) -> None:
    """Raises ChecksumMismatchError unless `path` hashes to `expected_sha256`."""
    path = Path(path)
    key = _key(path)
    if use_cache:
        digest = _verified.get(key)
        if digest is None:
            entry = _read_sidecar(path.parent).get(path.name)
            if entry and (entry.get("size"), entry.get("mtime_ns")) == key[1:]:
                digest = entry.get("sha256")
        if digest == expected_sha256:
            _verified[key] = digest
            return
    digest = sha256_file(path)
    if digest != expected_sha256:
        raise ChecksumMismatchError(
            f"checksum mismatch for {path}: expected sha256 {expected_sha256}, got {digest}. "
            f"The file is corrupt or a different version; delete it (it is re-downloaded "
            f"when data.download=true) or replace it with the official file.")
    _verified[key] = digest
    _write_sidecar(path.parent, path.name, key, digest)


def urlopen_fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Default fetch: stream `url` (http, https or file) into `dest`."""
    request = urllib.request.Request(url, headers={"User-Agent": "exvae-dist"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)


class _WrongBytes(Exception):
    """A mirror served bytes with another sha256 (the str is the digest)."""


def download_file(remote: RemoteFile, folder: Path, *, fetch: Optional[Fetch] = None) -> Path:
    """Fetches `remote` into `folder` (sha256 checked before the rename); returns its path.

    Tries each URL in order. Raises ChecksumMismatchError if every URL served wrong bytes,
    DataFileMissingError if none could be fetched.
    """
    fetch = fetch or urlopen_fetch
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # removed on failure
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / remote.name
    failures: list[str] = []
    mismatches: list[str] = []
    for url in remote.urls:
        try:
            log.info("downloading %s from %s", remote.name, url)
            with atomic_path(final) as tmp:  # renamed only once its checksum matches
                fetch(url, tmp)
                digest = sha256_file(tmp)
                if digest != remote.sha256:
                    raise _WrongBytes(digest)
        except _WrongBytes as wrong:
            mismatches.append(f"{url}: sha256 {wrong}")
            failures.append(f"{url}: checksum mismatch (expected {remote.sha256}, got {wrong})")
            continue
        except Exception as err:  # network, HTTP, disk: try the next mirror
            failures.append(f"{url}: {type(err).__name__}: {err}")
            continue
        key = _key(final)
        _verified[key] = remote.sha256
        _write_sidecar(folder, remote.name, key, remote.sha256)
        return final
    for empty in made:  # a refused start leaves no empty data folder behind
        try:
            empty.rmdir()
        except OSError:
            break
    if failures and len(mismatches) == len(failures):
        raise ChecksumMismatchError(
            f"downloaded {remote.name} has the wrong checksum: expected sha256 {remote.sha256}; "
            + "; ".join(mismatches) + f". Nothing was written to {folder}.")
    raise DataFileMissingError(
        f"could not download {remote.name} into {folder}: " + "; ".join(failures)
        + f". Copy the file into {folder}, or set data.root (EXVAE_DATA_DIR) to a data "
        f"folder that has {folder.name}/{remote.name}.")


def ensure_file(remote: RemoteFile, folder: Path, *, download: bool,
                fetch: Optional[Fetch] = None, verify: bool = True) -> Path:
    """The verified path of `remote` in `folder`, downloading it if missing and allowed."""
    path = Path(folder) / remote.name
    if path.is_file():
        if verify:
            verify_file(path, remote.sha256)
        return path
    if not download:
        raise DataFileMissingError(missing_message(path, allow_download=True, url=remote.urls[0]))
    return download_file(remote, Path(folder), fetch=fetch)


def missing_message(path: Path, *, allow_download: bool, url: Optional[str] = None) -> str:
    """The one wording of a missing-file error: what is missing, where, and the fixes."""
    folder = path.parent
    fixes = [f"set data.root (or EXVAE_DATA_DIR) to the folder that has "
             f"{folder.name}/{path.name}", f"copy the file into {folder}"]
    if allow_download:
        fixes.append(f"set data.download=true to fetch it{' from ' + url if url else ''}")
    return f"{path.name} not found in {folder}; " + ", or ".join(fixes) + "."
