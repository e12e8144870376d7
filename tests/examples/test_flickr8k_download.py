"""Download against an HTTP server on 127.0.0.1 that serves tiny archives built by the tests."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from examples.flickr8k.download import Archive, DownloadError, download_flickr8k, parse_checksums

ARCHIVES = (
    Archive("Flickr8k_Dataset.zip", None, "Flicker8k_Dataset"),
    Archive("Flickr8k_text.zip", None, "Flickr8k_text"),
)


def build_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


DATASET_ZIP = build_zip({
    "Flicker8k_Dataset/a.jpg": b"not really a jpeg",
    "__MACOSX/Flicker8k_Dataset/._a.jpg": b"resource fork",
})
# The published text archive has its files at the top level, without a folder.
TEXT_ZIP = build_zip({"Flickr8k.token.txt": b"a.jpg#0\tA caption .\n", "readme.txt": b"notes"})


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class ArchiveServer:
    """Threaded HTTP server on 127.0.0.1 that serves fixed bodies and can cut one short."""

    def __init__(self, files: dict[str, bytes], truncate: str | None = None) -> None:
        self.files, self.truncate = files, truncate
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name == server.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/mirror"

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def good_files() -> dict[str, bytes]:
    return {"Flickr8k_Dataset.zip": DATASET_ZIP, "Flickr8k_text.zip": TEXT_ZIP}


@pytest.fixture
def good_checksums() -> dict[str, str]:
    return {"Flickr8k_Dataset.zip": sha256(DATASET_ZIP), "Flickr8k_text.zip": sha256(TEXT_ZIP)}


def test_download_good_archives(tmp_path: Path, good_files, good_checksums) -> None:
    with ArchiveServer(good_files) as server:
        download_flickr8k(tmp_path, server.url, good_checksums, ARCHIVES, timeout=10)

    assert (tmp_path / "Flicker8k_Dataset" / "a.jpg").read_bytes() == b"not really a jpeg"
    assert (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").is_file()
    assert (tmp_path / "Flickr8k_text" / "readme.txt").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Flicker8k_Dataset", "Flickr8k_text"]
    assert server.requests == ["Flickr8k_Dataset.zip", "Flickr8k_text.zip"]


def test_download_without_checksum_logs_digest(tmp_path: Path, good_files, caplog) -> None:
    with ArchiveServer(good_files) as server, caplog.at_level("WARNING"):
        download_flickr8k(tmp_path, server.url, {}, ARCHIVES, timeout=10)

    assert sha256(DATASET_ZIP) in caplog.text
    assert (tmp_path / "Flicker8k_Dataset" / "a.jpg").is_file()


def test_download_checksum_mismatch(tmp_path: Path, good_files, good_checksums) -> None:
    checksums = dict(good_checksums, **{"Flickr8k_text.zip": "0" * 64})

    with ArchiveServer(good_files) as server, pytest.raises(DownloadError, match="Checksum mismatch"):
        download_flickr8k(tmp_path, server.url, checksums, ARCHIVES, timeout=10)

    assert list(tmp_path.iterdir()) == []


def test_download_interrupted_transfer(tmp_path: Path, good_files, good_checksums) -> None:
    with ArchiveServer(good_files, truncate="Flickr8k_Dataset.zip") as server:
        with pytest.raises(DownloadError) as caught:
            download_flickr8k(tmp_path, server.url, good_checksums, ARCHIVES, timeout=10)

    assert "Flickr8k_Dataset.zip" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_download_missing_file_on_server(tmp_path: Path, good_checksums) -> None:
    with ArchiveServer({"Flickr8k_Dataset.zip": DATASET_ZIP}) as server:
        with pytest.raises(DownloadError, match="404"):
            download_flickr8k(tmp_path, server.url, good_checksums, ARCHIVES, timeout=10)

    assert list(tmp_path.iterdir()) == []


def test_download_existing_target_rejected(tmp_path: Path, good_files, good_checksums) -> None:
    (tmp_path / "Flickr8k_text").mkdir()

    with ArchiveServer(good_files) as server, pytest.raises(FileExistsError, match="Flickr8k_text"):
        download_flickr8k(tmp_path, server.url, good_checksums, ARCHIVES, timeout=10)

    assert server.requests == []


def test_parse_checksums() -> None:
    digest = "ab" * 32

    assert parse_checksums([f"Flickr8k_text.zip={digest.upper()}"]) == {"Flickr8k_text.zip": digest}
    for invalid in ("Flickr8k_text.zip", "Flickr8k_text.zip=abc", f"x={'g' * 64}"):
        with pytest.raises(ValueError, match="Invalid checksum"):
            parse_checksums([invalid])


def test_failed_download_removes_created_folder(tmp_path: Path, good_files, good_checksums) -> None:
    data_dir = tmp_path / "new" / "flickr8k"

    with ArchiveServer(good_files, truncate="Flickr8k_text.zip") as server, pytest.raises(DownloadError):
        download_flickr8k(data_dir, server.url, good_checksums, ARCHIVES, timeout=10)

    assert not data_dir.exists()
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_download_keeps_existing_folder(tmp_path: Path, good_checksums) -> None:
    data_dir = tmp_path / "flickr8k"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("kept")

    with ArchiveServer({}) as server, pytest.raises(DownloadError, match="404"):
        download_flickr8k(data_dir, server.url, good_checksums, ARCHIVES, timeout=10)

    assert data_dir.is_dir()
    assert [path.name for path in data_dir.iterdir()] == ["notes.txt"]


def test_failed_download_keeps_existing_empty_folder(tmp_path: Path, good_checksums) -> None:
    data_dir = tmp_path / "flickr8k"
    data_dir.mkdir()

    with ArchiveServer({}) as server, pytest.raises(DownloadError, match="404"):
        download_flickr8k(data_dir, server.url, good_checksums, ARCHIVES, timeout=10)

    assert data_dir.is_dir()
