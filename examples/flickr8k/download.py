"""Download and unpack the two published Flickr8k archives.

Each archive is streamed to a staging folder inside the target folder, checked against its
expected SHA-256 and unpacked there. The unpacked folders move into place with ``os.replace`` only
after every archive has passed. On any error the staging folder is deleted, so a failed or
interrupted download leaves no partial dataset behind, and folders the download created are
removed again (pre-existing folders are kept).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MIRROR_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"


@dataclass(frozen=True)
class Archive:
    """A published archive: file name, expected SHA-256 (None if unknown) and the folder its content belongs in."""

    file_name: str
    sha256: str | None
    target_dir: str


# NOTE: no default digest is filled in because the mirror could not be reached to compute one.
# Without --sha256 NAME=DIGEST a download is checked for length only, and its digest is logged.
DEFAULT_ARCHIVES = (
    Archive("Flickr8k_Dataset.zip", None, "Flicker8k_Dataset"),
    Archive("Flickr8k_text.zip", None, "Flickr8k_text"),
)


class DownloadError(RuntimeError):
    """A download failed, was cut short or did not match its checksum."""


def parse_checksums(entries: list[str]) -> dict[str, str]:
    """Parse "NAME=SHA256" entries into a dict; raise ValueError naming an invalid entry."""
    checksums = {}
    for entry in entries:
        name, separator, digest = entry.partition("=")
        digest = digest.strip().lower()
        if not separator or len(digest) != 64 or any(char not in "0123456789abcdef" for char in digest):
            raise ValueError(f"Invalid checksum {entry!r}: expected NAME=<64 hex digits>.")
        checksums[name.strip()] = digest
    return checksums


def fetch(url: str, destination: Path, expected_sha256: str | None, timeout: float = 60.0) -> str:
    """Stream ``url`` to ``destination`` with a progress bar, check its length and SHA-256, return the digest.

    When ``expected_sha256`` is None the digest is logged as a warning and not checked.

    Raises:
        DownloadError: on an HTTP or network error, a body shorter than Content-Length, or a
            checksum mismatch. The partial file is deleted first.
    """
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            expected_bytes = response.headers.get("Content-Length")
            expected_bytes = int(expected_bytes) if expected_bytes is not None else None
            with open(destination, "wb") as handle, tqdm(
                total=expected_bytes, unit="B", unit_scale=True, desc=destination.name
            ) as bar:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as error:
        destination.unlink(missing_ok=True)
        raise DownloadError(f"Download of {url} failed after {received} bytes: {error}") from error

    if expected_bytes is not None and received != expected_bytes:
        destination.unlink(missing_ok=True)
        raise DownloadError(f"Download of {url} was cut short: {received} of {expected_bytes} bytes.")
    actual = digest.hexdigest()
    if expected_sha256 is None:
        logger.warning(
            "No expected SHA-256 for %s, so it was not verified. Its SHA-256 is %s; "
            "pin it with --sha256 %s=%s.", url, actual, destination.name, actual,
        )
        return actual
    if actual != expected_sha256:
        destination.unlink(missing_ok=True)
        raise DownloadError(
            f"Checksum mismatch for {url}: expected SHA-256 {expected_sha256}, got {actual}. "
            "Try again, or pass --sha256 NAME=DIGEST if the mirror publishes another digest."
        )
    return actual


def unpack(archive_path: Path, staging: Path, target_dir: str) -> Path:
    """Unpack a zip into ``staging/target_dir`` and return that folder.

    Entries already under a top-level ``target_dir/`` keep their paths, other entries go inside
    it. ``__MACOSX/`` entries are skipped. An entry that would land outside the staging folder
    raises DownloadError.
    """
    destination = staging / target_dir
    destination.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive_path) as archive:
        for member in archive.infolist():
            parts = Path(member.filename).parts
            if not parts or parts[0] == "__MACOSX":
                continue
            relative = Path(*parts[1:]) if parts[0] == target_dir else Path(*parts)
            if not relative.parts:
                continue
            output = (destination / relative).resolve()
            if not output.is_relative_to(destination.resolve()):
                raise DownloadError(f"Unsafe path {member.filename!r} in {archive_path.name}.")
            if member.is_dir():
                output.mkdir(parents=True, exist_ok=True)
                continue
            output.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(output, "wb") as sink:
                shutil.copyfileobj(source, sink)
    return destination


def download_flickr8k(
    data_dir: Path,
    mirror_url: str = DEFAULT_MIRROR_URL,
    checksums: dict[str, str] | None = None,
    archives: tuple[Archive, ...] = DEFAULT_ARCHIVES,
    timeout: float = 60.0,
) -> None:
    """Download, verify and unpack the Flickr8k archives into ``data_dir``.

    Args:
        data_dir: dataset folder; created if missing.
        mirror_url: base URL; each archive is fetched from ``<mirror_url>/<file name>``.
        checksums: file name to expected SHA-256, overriding the defaults of ``archives``.
        archives: the archives to fetch.
        timeout: socket timeout in seconds.

    Raises:
        DownloadError: a fetch failed or did not match; nothing new is left in ``data_dir``.
            Folders that this call created, ``data_dir`` included, are removed again.
        FileExistsError: a target folder already exists; delete it or choose another folder.
    """
    data_dir = Path(data_dir)
    checksums = checksums or {}
    unknown = set(checksums) - {archive.file_name for archive in archives}
    if unknown:
        raise ValueError(f"Checksums given for unknown archives: {sorted(unknown)}.")
    for archive in archives:
        if (data_dir / archive.target_dir).exists():
            raise FileExistsError(
                f"{data_dir / archive.target_dir} already exists; delete it to download again."
            )

    created = [folder for folder in (data_dir, *data_dir.parents) if not folder.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".flickr8k-download-", dir=data_dir))
    succeeded = False
    try:
        unpacked = []
        for archive in archives:
            url = f"{mirror_url.rstrip('/')}/{archive.file_name}"
            logger.info("Downloading %s.", url)
            archive_path = staging / archive.file_name
            fetch(url, archive_path, checksums.get(archive.file_name, archive.sha256), timeout)
            unpacked.append(unpack(archive_path, staging / "unpacked", archive.target_dir))
            archive_path.unlink()
        for folder in unpacked:
            os.replace(folder, data_dir / folder.name)
            logger.info("Unpacked %s.", data_dir / folder.name)
        succeeded = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not succeeded:
            remove_empty_folders(created)


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders a failed download created, deepest first. A folder that is not empty is kept."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            logger.warning("Could not remove %s, created by the failed download; it is not empty.", folder)
            return
