"""The search page in headless Chromium against a real service: a small exported model over a gallery of the
demo world's rendered pictures (with boxes). A query in the URL, a query typed, a click on a hit, the other
direction with a gallery image; the rendered hits (``li.hit[data-id]``) and the explanation are checked
against the API's answers, and screenshots are saved (``SCAN_SCREENSHOTS=DIR`` keeps them there).

Skipped, saying why, only where Chromium is not installed (``.ci/run`` installs Debian's ``chromium``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.runtime.browser import Browser, chromium, free_port

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(chromium() is None, reason="needs Chromium (apt-get install -y chromium; .ci/run does)"),
]
pytest.importorskip("websockets", reason="drives Chromium over the DevTools protocol with websockets")
pytest.importorskip("fastapi", reason="needs the 'serve' extra")

QUERY = "a red dog on the grass"
DONE = "document.querySelector('#status').dataset.state === 'done'"


def _http(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def service(small_engines, tmp_path_factory):
    """``runtime/serve.py`` over the demo world's test pictures: (base URL, pictures folder)."""
    from bench.demo.data import data_dir, make_dataset
    from bench.demo.render import BOXES_NAME, render_split
    from runtime.search import main as search

    root = tmp_path_factory.mktemp("browser")
    engine = small_engines["t2i"]  # img_dim 12, as the demo world below
    make_dataset(root, seed=0, img_dim=12, n_train=1, n_dev=1, n_test=12)
    names, _ = render_split(root, "test", root / "pictures")
    (root / "names.txt").write_text("\n".join(names) + "\n")
    data = data_dir(root)
    sources = ["--images", str(data / "test_ims.npy"), "--names", str(root / "names.txt")]
    sources += ["--boxes", str(root / "pictures" / BOXES_NAME), "--captions", str(data / "test_caps.txt")]
    assert search(["--engine", str(engine), "--gallery", str(root / "gal"), "--no-progress", *sources]) == 0
    port = free_port()
    cmd = [sys.executable, str(REPO / "runtime" / "serve.py"), "--engine", str(engine), "--gallery", str(root / "gal")]
    cmd += ["--image-dir", str(root / "pictures"), "--port", str(port), "--backend", "onnxruntime"]
    log = open(root / "serve.log", "w")  # noqa: SIM115 (the service's lifetime is the fixture's)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _http(base, "/readyz")["status"] == "ready":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the service did not start: {(root / 'serve.log').read_text()}")
            time.sleep(0.3)
        yield base, root / "pictures"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with Browser(width=900, height=1100) as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("SCAN_SCREENSHOTS")
    folder = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _explained(b: Browser, item: int) -> float:
    """Wait for the explanation of ``item`` to show; its score as the page holds it."""
    b.wait(f"!document.querySelector('#explain').hidden && document.querySelector('#explain').dataset.id === '{item}'")
    return float(b.js("document.querySelector('#explain').dataset.score"))


def _hits(b: Browser, list_id: str) -> list[int]:
    return b.js(f"[...document.querySelectorAll('#{list_id} li.hit')].map(e => Number(e.dataset.id))")


def test_a_query_in_the_url_a_typed_query_and_a_click(service, browser, shots):
    base, _ = service
    b = browser
    # 1. the query in the URL: the hits are the API's, in its order, with its scores
    b.go(f"{base}/?q={urllib.parse.quote_plus(QUERY)}&k=5")
    b.wait(DONE)
    want = _http(base, "/v1/search/text", {"queries": [QUERY], "k": 5})
    assert _hits(b, "hits") == want["ids"][0]
    scores = b.js("[...document.querySelectorAll('#hits li.hit .score')].map(e => e.textContent)")
    assert scores == [f"{s:.4f}" for s in want["scores"][0]]
    assert b.js("document.querySelector('#status').textContent").startswith("5 results")
    # thumbnails: each hit shows its picture, served from the image folder
    assert b.wait("[...document.querySelectorAll('#hits li.hit img')].every(i => i.complete && i.naturalWidth > 0)")
    b.screenshot(shots / "search_results.png")

    # 2. a typed query: the URL follows it, the hits are the API's
    typed = "a blue car"
    b.type("#q", typed)
    b.press_enter()
    b.wait(f"new URLSearchParams(location.search).get('q') === {json.dumps(typed)} && {DONE}")
    want = _http(base, "/v1/search/text", {"queries": [typed], "k": 5})
    b.wait(
        f"JSON.stringify([...document.querySelectorAll('#hits li.hit')].map(e => Number(e.dataset.id))) === "
        f"{json.dumps(json.dumps(want['ids'][0]).replace(' ', ''))}"
    )
    assert _hits(b, "hits") == want["ids"][0]

    # 3. a click on the second hit: its explanation, the API's, drawn on its picture
    hit = want["ids"][0][1]
    b.click(f"#hits li.hit[data-id='{hit}']")
    b.wait(f"!document.querySelector('#explain').hidden && document.querySelector('#explain').dataset.id === '{hit}'")
    explained = _http(base, "/v1/explain", {"query": typed, "id": hit})
    assert float(b.js("document.querySelector('#explain').dataset.score")) == pytest.approx(
        explained["score"], abs=1e-6
    )
    words = b.js("[...document.querySelectorAll('#words button.word')].map(e => e.textContent.trim())")
    assert len(words) == len(explained["words"])
    b.wait("document.querySelector('#picture').complete && document.querySelectorAll('#overlay rect.box').length > 0")
    # each word's most attended region (padding boxes have no area and are skipped), in the answer's numbers
    boxes = np.asarray(explained["boxes"])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    drawn = b.js(
        "[...document.querySelectorAll('#overlay rect.box')]"
        ".map(r => [Number(r.dataset.word), Number(r.dataset.region)])"
    )
    attention = np.asarray(explained["attention"])
    for w, region in drawn:
        assert area[region] > 0
        top = [int(r) for r in np.argsort(-attention[w], kind="stable") if area[r] > 0][:3]
        assert region in top, (w, region, top)
    assert b.js("new URLSearchParams(location.search).get('open')") == str(hit)
    b.hover("#words button.word[data-word='2']")
    b.screenshot(shots / "search_page.png")


def test_the_other_direction_with_a_gallery_image(service, browser, shots):
    base, _ = service
    b = browser
    b.go(f"{base}/?image=3&k=4")
    b.wait(DONE)
    want = _http(base, "/v1/search/images", {"ids": [3], "k": 4})
    assert _hits(b, "caption-hits") == want["ids"][0]
    names = b.js("[...document.querySelectorAll('#caption-hits li.hit .name')].map(e => e.textContent)")
    assert names == want["names"][0]
    caption = want["ids"][0][0]
    b.click(f"#caption-hits li.hit[data-id='{caption}']")
    b.wait(
        f"!document.querySelector('#explain').hidden && document.querySelector('#explain').dataset.id === '{caption}'"
    )
    explained = _http(base, "/v1/explain", {"image_id": 3, "id": caption})
    assert float(b.js("document.querySelector('#explain').dataset.score")) == pytest.approx(
        explained["score"], abs=1e-6
    )
    assert explained["score"] == pytest.approx(want["scores"][0][0], abs=1e-5)
    b.screenshot(shots / "search_image.png")


def test_a_phone_sized_window_and_an_error(service, browser, shots):
    base, _ = service
    b = browser
    b.viewport(390, 800, mobile=True)
    try:
        b.go(f"{base}/?q={urllib.parse.quote_plus(QUERY)}&k=3")
        b.wait(DONE)
        assert b.js("document.documentElement.scrollWidth <= 390 + 1")  # no sideways scrolling
        b.screenshot(shots / "search_phone.png", full_page=False)
        b.go(f"{base}/?q=zzz&k=3")  # words the model does not know still search (all <unk>)
        b.wait(DONE)
        b.go(f"{base}/?q=%20&k=3")  # an empty caption: the page says what the API said, or searches nothing
        time.sleep(0.5)
        assert b.js("document.querySelector('#status').dataset.state") in (None, "", "error", "done")
    finally:
        b.viewport(900, 1100)
