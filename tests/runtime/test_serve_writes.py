"""Writes that tell the truth: ids of several writers, other writers' commits, idempotency keys, unknown
outcomes, shutdown during an append, and disk faults (a full tmpfs, a read-only folder) with a real server."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from runtime.client import SearchClient
from runtime.gallery import GalleryFolder, ImageGallery
from runtime.searcher import OutcomeUnknown, ShardUnavailableError
from runtime.service.service import Service
from runtime.service.types import Appended
from tests.runtime.conftest import random_regions
from tests.runtime.serve_support import N_IMAGES, build_gallery, local_service, request, started
from tests.runtime.test_serve_process import free_port, start, wait_ready

IMAGES = "/v1/gallery/images"
TEXT = "/v1/search/text"


@pytest.fixture(scope="module")
def plain(engine_t2i, tmp_path_factory):
    """A gallery whose images have no names (appends send bare .npy bodies)."""
    return build_gallery(engine_t2i, tmp_path_factory.mktemp("writes_plain"), names=False)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def names_on_disk(folder: Path) -> list[str]:
    with ImageGallery.load(folder / "images") as g:
        return list(g.names)


def test_two_servers_answer_the_ids_their_items_got_and_see_each_others_commits(engine_t2i, gallery, tmp_path):
    folder = Path(shutil.copytree(gallery, tmp_path / "g"))
    a, b = local_service(engine_t2i, folder), local_service(engine_t2i, folder)
    try:
        answers: list[tuple[str, dict]] = []

        def writer(svc: Service, who: str, n: int, rounds: int) -> None:
            for r in range(rounds):
                names = [f"{who}{r}.{i}" for i in range(n)]
                body = {"features": random_regions(n, seed=r).tolist(), "names": names}
                resp = request(svc, "POST", IMAGES, json=body)
                assert resp.status_code == 200, resp.text
                answers.append((who, resp.json(), names))

        threads = [
            threading.Thread(target=writer, args=(a, "A", 3, 4)),
            threading.Thread(target=writer, args=(b, "B", 2, 4)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        on_disk = names_on_disk(folder)
        assert len(on_disk) == N_IMAGES + 4 * 3 + 4 * 2
        for who, body, names in answers:  # each answer's ids hold exactly its own items
            assert body["added"] == len(names) and [on_disk[i] for i in body["ids"]] == names, (who, body)
        # each server sees every commit before it answers: sizes, and searches over the other's items
        for svc in (a, b):
            assert request(svc, "GET", "/readyz").json()["images"] == len(on_disk)
            hits = request(svc, "POST", TEXT, json={"queries": ["dog"], "k": len(on_disk)}).json()
            assert sorted(hits["ids"][0]) == list(range(len(on_disk)))
            assert hits["names"][0] == [on_disk[i] for i in hits["ids"][0]]
    finally:
        a.close()
        b.close()


def test_a_server_sees_a_cli_append(engine_t2i, gallery, tmp_path):
    folder = Path(shutil.copytree(gallery, tmp_path / "g"))
    svc = local_service(engine_t2i, folder)
    try:
        feats = tmp_path / "more.npy"
        np.save(feats, random_regions(4, seed=9))
        names = tmp_path / "names.txt"
        names.write_text("c0\nc1\nc2\nc3\n")
        cmd = [sys.executable, "runtime/search.py", "--engine", str(engine_t2i), "--gallery", str(folder)]
        cmd += ["--images", str(feats), "--names", str(names), "--append"]
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}
        )
        assert done.returncode == 0, done.stderr
        assert request(svc, "GET", "/readyz").json()["images"] == N_IMAGES + 4
        r = request(svc, "POST", IMAGES, json={"features": random_regions(1, seed=3).tolist(), "names": ["s0"]})
        assert r.json() == {"added": 1, "ids": [N_IMAGES + 4], "count": N_IMAGES + 5}
    finally:
        svc.close()


def test_an_idempotency_key_applies_a_write_once_also_after_a_restart(engine_t2i, gallery, tmp_path):
    folder = Path(shutil.copytree(gallery, tmp_path / "g"))
    body = {"features": random_regions(2, seed=5).tolist(), "names": ["k0", "k1"]}
    key = {"Idempotency-Key": "write-1"}
    svc = local_service(engine_t2i, folder)
    try:
        first = request(svc, "POST", IMAGES, json=body, headers=key)
        assert first.status_code == 200 and first.json()["ids"] == [N_IMAGES, N_IMAGES + 1]
        other = request(svc, "POST", IMAGES, json={**body, "names": ["x0", "x1"]})
        again = request(svc, "POST", IMAGES, json=body, headers=key)
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert other.json()["ids"] == [N_IMAGES + 2, N_IMAGES + 3]
        r = request(svc, "POST", "/v1/gallery/captions", json={"captions": ["a dog"]}, headers={"Idempotency-Key": "c"})
        assert (
            request(
                svc, "POST", "/v1/gallery/captions", json={"captions": ["a dog"]}, headers={"Idempotency-Key": "c"}
            ).json()
            == r.json()
        )
    finally:
        svc.close()
    svc = local_service(engine_t2i, folder)  # the keys are kept with the gallery
    try:
        assert request(svc, "POST", IMAGES, json=body, headers=key).json() == first.json()
        assert names_on_disk(folder) == [*names_on_disk(gallery), "k0", "k1", "x0", "x1"]
    finally:
        svc.close()


class _Stub:
    """An executor whose appends fail as ``error`` says."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def search(self, direction, queries, k):
        raise AssertionError("not searched")

    def prepare(self, direction, queries, field="queries"):  # the app checks appended features as queries
        return SimpleNamespace(regions=queries)

    def append_images(self, regions, names, key=None):
        raise self.error

    def sizes(self):
        return {"images": 1, "captions": None}

    def refresh(self):
        pass

    def close(self):
        pass


def test_an_append_whose_outcome_is_unknown_is_504_without_retry_after():
    svc = started(Service(lambda: _Stub(OutcomeUnknown("add_images: the outcome of appending 1 items is unknown"))))
    try:
        r = request(svc, "POST", IMAGES, json={"features": random_regions(1).tolist()})
        assert r.status_code == 504 and r.json()["committed"] == "unknown" and "retry-after" not in r.headers
    finally:
        svc.close()


def test_a_shard_that_times_out_during_an_append_is_an_unknown_outcome():
    from runtime.cluster import Shards

    shards = Shards.__new__(Shards)

    def late(*a, **kw):
        raise ShardUnavailableError("add_images: shard 1 did not answer within 0.5 s (dead, restarting or overloaded)")

    shards._gather = late
    with pytest.raises(OutcomeUnknown, match=r"outcome of appending 3 items is unknown.*did not answer"):
        shards._append(object(), "add_images", 3)


# ---------------------------------------------------------------------------------------------- real processes


def serve(engine: Path, folder: Path, tmp_path: Path, *extra: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--engine", str(engine), "--gallery", str(folder), "--port", str(port), "--threads", "1", "--no-progress"]
    proc, log = start([*args, *extra], tmp_path)
    wait_ready(url, proc, log)
    return proc, log, url


def test_the_client_retries_a_write_with_its_key_and_it_is_applied_once(engine_t2i, gallery, tmp_path):
    folder = Path(shutil.copytree(gallery, tmp_path / "g"))
    proc, _log, url = serve(engine_t2i, folder, tmp_path)
    real = httpx.HTTPTransport()
    calls: list[str | None] = []

    class LostAnswer(httpx.BaseTransport):
        """Forwards every request; the first write's answer is lost and replaced by a 503."""

        def handle_request(self, req: httpx.Request) -> httpx.Response:
            resp = real.handle_request(req)
            if req.url.path == IMAGES:
                calls.append(req.headers.get("idempotency-key"))
                if len(calls) == 1:
                    resp.read()
                    return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "lost"})
            return resp

    try:
        client = SearchClient(url, transport=LostAnswer(), sleep=lambda s: None)
        out = client.add_images(random_regions(2, seed=8), ["r0", "r1"])
        assert len(calls) == 2 and calls[0] == calls[1] and calls[0]
        assert out == Appended(added=2, first_id=N_IMAGES, count=N_IMAGES + 2)
        assert httpx.get(url + "/readyz").json()["images"] == N_IMAGES + 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_sigterm_during_a_long_append_finishes_it_and_answers(engine_t2i, plain, tmp_path):
    folder = Path(shutil.copytree(plain, tmp_path / "g"))
    limits = ("--max-append-mb", "1024", "--max-append-items", "200000")
    proc, log, url = serve(engine_t2i, folder, tmp_path, "--grace-s", "0.3", *limits)
    n = 150_000
    result: dict = {}

    def append():
        try:
            result["r"] = httpx.post(
                url + IMAGES,
                content=npy(random_regions(n, seed=2)),
                headers={"Content-Type": "application/octet-stream"},
                timeout=120,
            )
        except httpx.HTTPError as e:
            result["r"] = e

    t = threading.Thread(target=append)
    t.start()
    try:
        for _ in range(1000):  # SIGTERM once the append is in flight
            if "scan_requests_in_flight 1.0" in httpx.get(url + "/metrics").text:
                break
            time.sleep(0.005)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        rc = proc.wait(120)
        text = log.read_text()
        size = len(ImageGallery.load(folder / "images"))
        r = result["r"]
        if size == N_IMAGES + n:  # committed: the client was told so, before the server said "stopped"
            assert isinstance(r, httpx.Response) and r.status_code == 200, (r, text)
            assert r.json()["count"] == N_IMAGES + n
            # On a busy machine the append can commit before SIGTERM lands; when the signal came during it, the
            # commit is logged before the server stops.
            assert text.index("150040 images") < text.index("stopped")
        else:  # never started: the client was told it was not written
            assert size == N_IMAGES
            assert not (isinstance(r, httpx.Response) and r.status_code == 200), text
        assert rc == 0 and "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted for the test (skipped only where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    """Leave about ``leave`` bytes free on the file system of ``mnt``."""
    free = shutil.disk_usage(mnt).free
    with open(mnt / "ballast", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != ".lock")


def test_a_full_disk_is_507_naming_the_path_and_bytes_and_leaves_nothing(engine_t2i, plain, tmpfs, tmp_path):
    folder = Path(shutil.copytree(plain, tmpfs / "g"))
    proc, log, url = serve(engine_t2i, folder, tmp_path, "--max-append-mb", "64")
    try:
        before = listing(folder)
        fill(tmpfs, 64 << 10)
        body = npy(random_regions(2000, seed=4))
        r = httpx.post(url + IMAGES, content=body, headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 507, r.text
        assert str(folder / "images") in r.json()["error"] and "bytes" in r.json()["error"]
        assert httpx.get(url + "/healthz").status_code == 200 and proc.poll() is None
        assert listing(folder) == before  # no temporaries, no orphaned generation arrays
        assert GalleryFolder(folder).verify()[0][2] == N_IMAGES  # the old generation is intact
        assert httpx.get(url + "/readyz").json()["images"] == N_IMAGES
        (tmpfs / "ballast").unlink()  # space again: the next append works
        r = httpx.post(
            url + IMAGES, content=npy(random_regions(3)), headers={"Content-Type": "application/octet-stream"}
        )
        assert r.status_code == 200 and r.json()["ids"] == [N_IMAGES, N_IMAGES + 1, N_IMAGES + 2], r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "Traceback" not in log.read_text()


def test_a_full_disk_in_the_cli_is_one_line_and_leaves_nothing(engine_t2i, plain, tmpfs, tmp_path):
    folder = Path(shutil.copytree(plain, tmpfs / "g"))
    feats = tmp_path / "feats.npy"
    np.save(feats, random_regions(3000, seed=6))
    before = listing(folder)
    fill(tmpfs, 64 << 10)
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "runtime/search.py", "--engine", str(engine_t2i), "--gallery", str(folder)]
    cmd += ["--images", str(feats), "--append"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode not in (0, -signal.SIGBUS), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left" in lines[0] and "bytes" in lines[0], done.stderr
    assert listing(folder) == before


def test_a_read_only_gallery_is_a_clear_error_and_the_server_stays_up(engine_t2i, plain, tmpfs, tmp_path):
    folder = Path(shutil.copytree(plain, tmpfs / "g"))
    proc, _log, url = serve(engine_t2i, folder, tmp_path)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        r = httpx.post(url + IMAGES, json={"features": random_regions(1).tolist()})
        assert r.status_code == 500 and "read-only" in r.json()["error"] and str(folder) in r.json()["error"], r.text
        assert httpx.get(url + "/readyz").json()["images"] == N_IMAGES
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
