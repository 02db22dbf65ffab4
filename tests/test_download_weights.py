"""download_weights: resumable, verified, atomic downloads against a local HTTP server (127.0.0.1 only).

Nothing here touches the internet: the server is started by the test in a thread and serves
small in-memory files, optionally cutting a response short, failing, or ignoring Range.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from fastavatar.apps import weights as W
from fastavatar.io.download import DownloadError, download, partial_path


class _Files:
    """What the server serves, and how it misbehaves."""

    def __init__(self):
        self.blobs = {}  # path -> bytes
        self.cut_after = None  # send only this many bytes of a full-body response, then close
        self.fail_status = None  # answer every request with this HTTP status
        self.ignore_range = False  # answer 200 with the whole body even when Range is asked
        self.requests = []  # (path, Range header or None)


def _handler(files: _Files):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):  # noqa: N802
            rng = self.headers.get("Range")
            files.requests.append((self.path, rng))
            if files.fail_status:
                self.send_response(files.fail_status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = files.blobs.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if match and not files.ignore_range:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if files.cut_after is not None and start == 0:
                self.wfile.write(payload[: files.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server():
    files = _Files()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(files))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    files.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield files
    httpd.shutdown()
    httpd.server_close()


def _blob(n: int = 300_000, seed: int = 1) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verifies_and_skips_existing(server, tmp_path):
    data = _blob()
    server.blobs["/a.bin"] = data
    dest = tmp_path / "sub" / "a.bin"
    result = download(server.base + "/a.bin", dest, _sha(data), show_progress=False)
    assert result.status == "downloaded" and dest.read_bytes() == data and result.bytes_fetched == len(data)
    assert not partial_path(dest).exists()
    n_requests = len(server.requests)
    again = download(server.base + "/a.bin", dest, _sha(data), show_progress=False)
    assert again.status == "present" and len(server.requests) == n_requests  # no network for a verified file


def test_checksum_mismatch_installs_nothing(server, tmp_path):
    data = _blob()
    server.blobs["/a.bin"] = data
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download(server.base + "/a.bin", dest, _sha(b"something else"), show_progress=False)
    assert not dest.exists() and not partial_path(dest).exists()


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    data = _blob()
    server.blobs["/big.bin"] = data
    server.cut_after = 100_000
    dest = tmp_path / "big.bin"
    with pytest.raises(DownloadError, match="interrupted"):
        download(server.base + "/big.bin", dest, _sha(data), retries=0, show_progress=False)
    assert not dest.exists()
    assert partial_path(dest).stat().st_size == 100_000  # what arrived is kept
    result = download(server.base + "/big.bin", dest, _sha(data), retries=0, show_progress=False)
    assert server.requests[-1] == ("/big.bin", "bytes=100000-")
    assert result.status == "resumed" and result.bytes_fetched == len(data) - 100_000
    assert dest.read_bytes() == data and not partial_path(dest).exists()


def test_retries_resume_within_one_call(server, tmp_path):
    data = _blob(seed=2)
    server.blobs["/big.bin"] = data
    server.cut_after = 50_000
    dest = tmp_path / "big.bin"
    result = download(server.base + "/big.bin", dest, _sha(data), retries=1, show_progress=False)
    assert result.status == "resumed" and dest.read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=50000-"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = _blob(seed=3)
    server.blobs["/a.bin"] = data
    dest = tmp_path / "a.bin"
    partial_path(dest).write_bytes(b"stale bytes from some other file")
    server.ignore_range = True
    download(server.base + "/a.bin", dest, _sha(data), show_progress=False)
    assert dest.read_bytes() == data


def test_server_error_is_one_line(server, tmp_path):
    server.blobs["/a.bin"] = _blob()
    server.fail_status = 500
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError) as info:
        download(server.base + "/a.bin", dest, _sha(b""), show_progress=False)
    message = str(info.value)
    assert "HTTP 500" in message and "/a.bin" in message and "\n" not in message
    assert not dest.exists() and not partial_path(dest).exists()


def test_missing_file_on_server(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.base + "/nope.bin", tmp_path / "x.bin", _sha(b""), show_progress=False)


def test_target_not_writable(server, tmp_path):
    data = _blob()
    server.blobs["/a.bin"] = data
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(DownloadError, match="cannot create the folder"):
        download(server.base + "/a.bin", blocker / "weights" / "a.bin", _sha(data), show_progress=False)
    assert server.requests == []  # refused before fetching anything


def test_target_folder_without_write_permission(server, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; covered by test_target_not_writable")
    data = _blob()
    server.blobs["/a.bin"] = data
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(DownloadError, match="not writable"):
            download(server.base + "/a.bin", folder / "a.bin", _sha(data), show_progress=False)
    finally:
        folder.chmod(0o700)


def test_existing_file_with_other_content_is_kept(server, tmp_path):
    data = _blob()
    server.blobs["/a.bin"] = data
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"my own file")
    with pytest.raises(DownloadError, match="--force"):
        download(server.base + "/a.bin", dest, _sha(data), show_progress=False)
    assert dest.read_bytes() == b"my own file" and server.requests == []
    download(server.base + "/a.bin", dest, _sha(data), force=True, show_progress=False)
    assert dest.read_bytes() == data


def _zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_archive_entry_installs_members_and_verifies(server, tmp_path):
    det, rec = _blob(1000, 4), _blob(2000, 5)
    archive = _zip_bytes({"det_10g.onnx": det, "w600k_r50.onnx": rec, "genderage.onnx": b"unused"})
    server.blobs["/buffalo_l.zip"] = archive
    entry = replace(
        next(e for e in W.REGISTRY if e.name == "buffalo_l"),
        url=server.base + "/buffalo_l.zip", sha256=_sha(archive),
        members={"det_10g.onnx": _sha(det), "w600k_r50.onnx": _sha(rec)},
    )
    weights_dir = tmp_path / "pretrained_weights"
    line = W.install(entry, weights_dir, show_progress=False)
    folder = weights_dir / "insightface" / "buffalo_l"
    assert "extracted" in line
    assert (folder / "det_10g.onnx").read_bytes() == det and (folder / "w600k_r50.onnx").read_bytes() == rec
    assert not (folder / "genderage.onnx").exists() and not (folder.parent / "buffalo_l.zip").exists()
    # the face loader finds the installed pack where it searches
    from fastavatar.face.embedding import resolve_insightface_root

    assert resolve_insightface_root(folder) == folder
    assert W.verify_download(entry, weights_dir).ok
    n = len(server.requests)
    assert "present" in W.install(entry, weights_dir, show_progress=False) and len(server.requests) == n
    (folder / "w600k_r50.onnx").write_bytes(b"corrupted")
    report = W.verify_download(entry, weights_dir)
    assert not report.ok and any(line.startswith("BAD") and "w600k_r50.onnx" in line for line in report.lines)


def test_lpips_trunk_lands_in_torch_hub_cache(server, tmp_path, monkeypatch):
    import torch.hub

    from fastavatar.losses import lpips_trunk_path

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    data = _blob(5000, 6)
    server.blobs["/alexnet-owt-7be5be79.pth"] = data
    entry = replace(next(e for e in W.REGISTRY if e.name == "lpips_alex"),
                    url=server.base + "/alexnet-owt-7be5be79.pth", sha256=_sha(data))
    W.install(entry, tmp_path / "pw", show_progress=False)
    assert lpips_trunk_path("alex").read_bytes() == data
    assert lpips_trunk_path("alex") == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"


def test_registry_pins_match_published_prefixes():
    for entry in W.REGISTRY:
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry.name
        published = re.search(r"-([0-9a-f]{8})\.pth$", entry.url)
        if "download.pytorch.org" in entry.url:
            assert published and entry.sha256.startswith(published.group(1)), entry.name


def test_dry_run_lists_destinations_and_fetches_nothing(tmp_path):
    lines = []
    rc = W.run_download_weights(None, tmp_path / "pw", dry_run=True, echo=lines.append)
    assert rc == 0
    text = "\n".join(lines)
    for entry in W.REGISTRY:
        assert entry.url in text and str(entry.target(tmp_path / "pw")) in text
    assert "drive.google.com" in text and "flame.is.tue.mpg.de" in text
    assert not (tmp_path / "pw").exists()


def test_only_selects_and_rejects_unknown():
    downloads, manual = W.select(["lpips_alex", "flame"])
    assert [e.name for e in downloads] == ["lpips_alex"] and [m.name for m in manual] == ["flame"]
    with pytest.raises(ValueError, match="unknown name"):
        W.select(["lpips_squeeze"])


def test_verify_flame_file(tmp_path):
    from flame_fixtures import save_tiny_flame_pickle

    weights_dir = tmp_path / "pw"
    entry = next(m for m in W.MANUAL if m.name == "flame")
    report = W.verify_manual(entry, weights_dir)
    assert not report.ok and any("flame.is.tue.mpg.de" in line for line in report.lines)
    (weights_dir / "flame").mkdir(parents=True)
    save_tiny_flame_pickle(weights_dir / "flame" / "flame2023.pkl")
    report = W.verify_manual(entry, weights_dir)
    assert report.ok and "vertices" in report.lines[0]
    (weights_dir / "flame" / "flame2023.pkl").write_bytes(b"not a pickle")
    report = W.verify_manual(entry, weights_dir)
    assert not report.ok and report.lines[0].startswith("BAD")


def test_verify_fastavatar_checks_strict_loading(tmp_path):
    import torch

    weights_dir = tmp_path / "pw"
    weights_dir.mkdir()
    entry = next(m for m in W.MANUAL if m.name == "fastavatar")
    for name in entry.files:
        torch.save({"model_dict": {"unrelated.weight": torch.zeros(2)}}, weights_dir / name)
    report = W.verify_manual(entry, weights_dir)
    assert not report.ok
    bad = [line for line in report.lines if line.startswith("BAD")]
    assert len(bad) == 3 and all("\n" not in line for line in bad)


def test_script_dry_run_runs(repo_root):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(repo_root / "scripts" / "download_weights.py"), "--dry-run",
                          "--only", "lpips_vgg"], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "vgg16-397923af.pth" in out.stdout and "buffalo_l" not in out.stdout
