"""nclab.fetch offline: the plans, the dry-run table, resumable verified downloads from a local
HTTP server with Range support, checksum failures, and fast failure on an unreachable origin."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import time

import pytest

from nclab import cli, downstream, fetch, mirror


# --------------------------------------------------------------------------- a local server
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path; honours ``Range: bytes=N-`` unless
    ``server.ignore_range``; records the Range headers it saw."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        data: bytes = self.server.payload
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        if rng and not self.server.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.payload = os.urandom(300_000)
    srv.ranges = []
    srv.ignore_range = False
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv, name="file.bin") -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------- downloads
def test_download_resumes_partial_file_and_verifies(server, tmp_path):
    data = server.payload
    dest = tmp_path / "sub" / "file.bin"
    dest.parent.mkdir()
    (dest.parent / "file.bin.part").write_bytes(data[:123_456])
    out = fetch.download(_url(server), dest, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert out == dest and dest.read_bytes() == data
    assert server.ranges == ["bytes=123456-"]
    assert not (dest.parent / "file.bin.part").exists()


def test_download_md5_and_sha256_prefix(server, tmp_path):
    data = server.payload
    fetch.download(_url(server), tmp_path / "a", md5=hashlib.md5(data).hexdigest(), progress=False)
    prefix = hashlib.sha256(data).hexdigest()[:8]
    fetch.download(_url(server), tmp_path / "b", sha256_prefix=prefix, progress=False)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == data


def test_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "f"
    (tmp_path / "f.part").write_bytes(b"x" * 1000)  # garbage that must not be kept
    fetch.download(_url(server), dest, sha256=hashlib.sha256(server.payload).hexdigest(),
                   progress=False)
    assert dest.read_bytes() == server.payload


def test_complete_part_file_answered_416_is_verified(server, tmp_path):
    (tmp_path / "f.part").write_bytes(server.payload)
    fetch.download(_url(server), tmp_path / "f", md5=hashlib.md5(server.payload).hexdigest(),
                   progress=False)
    assert server.ranges == [f"bytes={len(server.payload)}-"]
    assert (tmp_path / "f").read_bytes() == server.payload


def test_wrong_checksum_raises_and_keeps_no_file(server, tmp_path):
    dest = tmp_path / "f"
    with pytest.raises(fetch.ChecksumMismatch, match="f.*expected 0{32}.*deleted"):
        fetch.download(_url(server), dest, name="f", md5="0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_origin_fails_fast_naming_the_file(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    t0 = time.perf_counter()
    with pytest.raises(fetch.SourceUnreachable, match="cifar10.*127.0.0.1"):
        fetch.download(url, tmp_path / "c.tar.gz", name="cifar10", timeout=2, progress=False)
    assert time.perf_counter() - t0 < 10
    assert list(tmp_path.iterdir()) == []


def test_fetch_reports_each_missing_file_and_waits_once_per_host(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("NCLAB_OFFLINE", raising=False)
    port = _closed_port()
    items = [fetch.FetchItem(f"w{i}", "torchvision", f"http://127.0.0.1:{port}/w{i}-abcd.pth",
                             tmp_path / f"w{i}-abcd.pth", 10, True, "test", sha256_prefix="abcd")
             for i in range(3)]
    logs: list[str] = []
    t0 = time.perf_counter()
    results = fetch.fetch(items, timeout=2, progress=False, log=logs.append)
    assert time.perf_counter() - t0 < 10
    assert [it.name for it, _ in results] == ["w0", "w1", "w2"]
    for it, state in results:
        assert it.name in state and it.url in state
    assert all(line.startswith("FAILED") for line in logs)


def test_offline_switch_fails_every_missing_file_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("NCLAB_OFFLINE", "1")
    it = fetch.FetchItem("resnet18", "torchvision", "https://download.pytorch.org/models/x-ab.pth",
                         tmp_path / "x-ab.pth", 1, True, "test")
    t0 = time.perf_counter()
    [(_, state)] = fetch.fetch([it], progress=False, log=lambda s: None)
    assert time.perf_counter() - t0 < 1
    assert "offline switch" in state and it.url in state


def test_mirror_weight_fetched_into_the_mirror_layout(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NCLAB_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("NCLAB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    spec = mirror.MIRROR["resnet20"]
    [it] = [i for i in fetch.plan("real") if i.name == "resnet20"]
    assert it.dest == tmp_path / spec.path and it.sha256 == spec.sha256
    local = fetch.FetchItem(it.name, it.kind, _url(server), it.dest, it.size, True, "test",
                            sha256=it.sha256)
    [(_, state)] = fetch.fetch([local], timeout=2, progress=False, log=lambda s: None)
    assert "SHA-256" in state and "resnet20" in state  # random bytes are not the published file
    assert not it.dest.exists() and not it.dest.with_name(it.dest.name + ".part").exists()


# --------------------------------------------------------------------------- plans
def test_course_plan_lists_datasets_and_weights():
    items = fetch.plan("course")
    names = [it.name for it in items]
    for name in ("cifar10", "cifar100", "dtd", "oxford_pets/images.tar.gz",
                 "oxford_pets/annotations.tar.gz", "fgvc_aircraft", "resnet18", "resnet34",
                 "resnet50", "densenet121", "densenet169", "densenet201", "mobilenet_v2",
                 "googlenet", "vit_b32", "clip_vit_b32", "convnext_atto", "miniimagenet",
                 "cifar10_2k", "fashion_mnist_2k", "resnet20",  # ch. 01's projection: the mirror
                 "oval_wide", "sdp_cnn_a_adv", "sdp_cnn_a_mix4"):  # ch. 03's recipes: the zoo
        assert name in names, name
    recipes = downstream.recipe_study("course").models
    assert set(recipes) <= set(names) and len(recipes) == 8
    assert len(names) == len(set(names)) == 29
    assert {it.kind for it in items} == {"dataset", "torchvision", "hf", "mirror", "manual"}
    total, exact = fetch.total_size(items)
    assert 5e9 < total < 7e9 and not exact
    assert [it.name for it in items if it.kind == "manual"] == ["miniimagenet"]
    assert fetch.plan("paper")[-1].name == "miniimagenet"


def test_real_plan_is_the_mirror_and_smoke_needs_nothing():
    items = fetch.plan("real")
    assert sorted(it.name for it in items) == sorted(mirror.MIRROR)
    assert all(it.kind == "mirror" for it in items)
    total, _ = fetch.total_size(items)
    assert 30e6 < total < 40e6
    assert fetch.plan("smoke") == []


def test_archive_table_agrees_with_torchvision():
    import torchvision.datasets as tvd

    t = fetch.TORCHVISION_ARCHIVES
    assert t["cifar10"][0][1:3] == (tvd.CIFAR10.url, tvd.CIFAR10.tgz_md5)
    assert t["cifar100"][0][1:3] == (tvd.CIFAR100.url, tvd.CIFAR100.tgz_md5)
    assert t["dtd"][0][1:3] == (tvd.DTD._URL, tvd.DTD._MD5)
    assert tuple(r[1:3] for r in t["oxford_pets"]) == tuple(tvd.OxfordIIITPet._RESOURCES)
    assert t["fgvc_aircraft"][0][1] == tvd.FGVCAircraft._URL


def test_hf_table_agrees_with_timm_and_open_clip():
    timm = pytest.importorskip("timm")
    open_clip = pytest.importorskip("open_clip")
    for name, arch in (("vit_b32", "vit_base_patch32_224"), ("convnext_atto", "convnext_atto")):
        assert fetch.HF_WEIGHTS[name][0] == timm.models.get_pretrained_cfg(arch).hf_hub_id
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert fetch.HF_WEIGHTS["clip_vit_b32"][0] == cfg["hf_hub"].rstrip("/")


def test_human_size():
    assert fetch.human_size(0) == "0 B"
    assert fetch.human_size(170_498_071) == "170.5 MB"
    assert fetch.human_size(2_750_000_000, exact=False) == "approx. 2.8 GB"
    assert fetch.human_size(None) == "unknown"


def test_dry_run_prints_the_table_and_total(capsys):
    assert cli.main(["fetch", "--dry-run", "--profile", "course"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Plan for profile `course`: 28 file(s) to download."
    assert "| file | origin | size | check | used by |" in lines
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| file")]
    assert len(rows) == 28
    assert any(r.startswith("| cifar10 | https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz | "
                            "170.5 MB | MD5 (torchvision) |") for r in rows)
    assert any(ln.startswith("Total: approx. 6.0 GB") for ln in lines)
    assert "Manual" in out and "miniimagenet" in out


def test_setup_page_shows_the_course_plan_as_printed(capsys):
    """book/setup.md's table and total are the dry-run's own lines, so the page cannot drift from the
    plan."""
    from pathlib import Path

    assert cli.main(["fetch", "--dry-run", "--profile", "course"]) == 0
    printed = capsys.readouterr().out.splitlines()
    page = (Path(__file__).resolve().parents[1] / "book" / "setup.md").read_text().splitlines()
    start = page.index("| file | origin | size | check | used by |")
    end = next(i for i in range(start, len(page)) if not page[i].startswith("|"))
    assert page[start:end] == [ln for ln in printed if ln.startswith("|")]
    total = next(ln for ln in printed if ln.startswith("Total: "))
    assert total in page[end:end + 3]


def test_dataset_archive_is_verified_and_extracted_into_the_torchvision_layout(server, tmp_path,
                                                                              monkeypatch):
    import io
    import tarfile

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("NCLAB_OFFLINE", raising=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"hello"))
    server.payload = buf.getvalue()
    it = fetch.FetchItem("cifar10", "dataset", _url(server, "cifar-10-python.tar.gz"),
                         tmp_path / "cifar-10-python.tar.gz", len(server.payload), True, "test",
                         md5=hashlib.md5(server.payload).hexdigest(), extract_to=tmp_path,
                         extracted=tmp_path / "cifar-10-batches-py")
    [(_, state)] = fetch.fetch([it], timeout=2, progress=False, log=lambda s: None)
    assert state == "fetched"
    assert (tmp_path / "cifar-10-batches-py" / "batches.meta").read_bytes() == b"hello"
    [(_, state)] = fetch.fetch([it], timeout=2, progress=False, log=lambda s: None)
    assert state == "present" and len(server.ranges) == 1  # nothing downloaded twice


def test_cli_fetch_offline_exits_1_naming_the_files(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NCLAB_OFFLINE", "1")
    monkeypatch.setenv("NCLAB_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("NCLAB_DATA", str(tmp_path))
    assert cli.main(["fetch", "--profile", "real", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "profile real: 0 of 25 file(s) in place" in captured.out
    assert "resnet20" in captured.out and mirror.MIRROR["resnet20"].origins[0] in captured.out
    assert "25 file(s) not fetched" in captured.err
    assert cli.main(["fetch", "--profile", "smoke"]) == 0


def test_reachable_is_bounded_by_its_timeout():
    from nclab.net import reachable

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert reachable(f"http://127.0.0.1:{port}/x", timeout=2.0)
    t0 = time.perf_counter()
    assert not reachable(f"http://127.0.0.1:{port}/x", timeout=2.0)  # closed now
    assert time.perf_counter() - t0 < 2.5
