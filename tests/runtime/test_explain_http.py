"""The search page's endpoints (runtime/service/static/API.md): the page and its files, the image listing and
pictures, gallery images as queries, POST /v1/explain in every body form (the same explanation as the CLI's),
their 4xx JSON errors and OpenAPI entries."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from runtime.options import EngineOptions
from runtime.pictures import ImageFolder
from runtime.search import main as search_main
from runtime.service.executor import Executor
from runtime.service.requests import NPY
from runtime.service.service import Service
from tests.runtime.conftest import random_captions, random_regions
from tests.runtime.serve_support import request, started
from tests.runtime.test_explain_search import random_boxes

pytest.importorskip("fastapi")

N, M, R = 7, 9, 5


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["t2i", "i2t"])
def setup(request, small_engines, tmp_path_factory):
    """A gallery (images with names and boxes, captions; pictures for images 0..4) built with the CLI, and a
    loaded service over it with the image folder."""
    engine = small_engines[request.param]
    root = tmp_path_factory.mktemp(f"explain_http_{request.param}")
    np.save(root / "ims.npy", random_regions(N, seed=21))
    np.save(root / "boxes.npy", random_boxes(N, seed=22))
    (root / "caps.txt").write_text("\n".join(random_captions(M, seed=23)) + "\n", encoding="utf-8")
    (root / "names.txt").write_text("\n".join(f"pic{i}" for i in range(N)) + "\n", encoding="utf-8")
    (root / "pictures").mkdir()
    for i in range(5):
        (root / "pictures" / f"pic{i}{'.png' if i % 2 else '.jpg'}").write_bytes(b"picture %d" % i)
    sources = ["--images", str(root / "ims.npy"), "--names", str(root / "names.txt")]
    sources += ["--boxes", str(root / "boxes.npy"), "--captions", str(root / "caps.txt")]
    assert search_main(["--engine", str(engine), "--gallery", str(root / "gal"), "--no-progress", *sources]) == 0
    service = started(
        Service(
            lambda: Executor.open([engine], root / "gal", EngineOptions(backend="onnxruntime", threads=1)),
            pictures=ImageFolder(root / "pictures"),
        )
    )
    yield engine, root, service
    service.close()


def post(service, url, body=None, **kw):
    if body is not None:
        kw["json"] = body
    return request(service, "POST", url, **kw)


def test_the_page_and_its_files_are_served(setup):
    _, _, service = setup
    page = request(service, "GET", "/?q=a+dog")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'src="static/app.js"' in page.text
    for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = request(service, "GET", f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == f"{media}; charset=utf-8" and len(r.content) > 100
    for bad in ("/static/API.md", "/static/nope.js", "/static/..%2Fapp.py"):
        r = request(service, "GET", bad)
        assert r.status_code == 404 and "error" in r.json(), bad


def test_images_listing_and_pictures(setup):
    _, _, service = setup
    r = request(service, "GET", "/v1/images?offset=5&limit=24").json()
    assert r == {"count": N, "offset": 5, "ids": [5, 6], "names": ["pic5", "pic6"], "pictures": True}
    assert request(service, "GET", "/v1/images").json()["ids"] == list(range(N))
    assert request(service, "GET", "/v1/images?offset=99").json()["ids"] == []
    for bad in ("limit=0", "limit=101", "offset=-1", "offset=x"):
        r = request(service, "GET", f"/v1/images?{bad}")
        assert r.status_code == 422 and r.json()["field"] == bad.split("=")[0], bad
    one = request(service, "GET", "/v1/images/1")
    assert one.status_code == 200 and one.headers["content-type"] == "image/png" and one.content == b"picture 1"
    assert request(service, "GET", "/v1/images/2").headers["content-type"] == "image/jpeg"
    for item, status in (("5", 404), ("7", 404), ("-1", 404), ("x", 422)):  # no file, past the gallery, not an id
        r = request(service, "GET", f"/v1/images/{item}")
        assert r.status_code == status and "error" in r.json(), item


def test_gallery_images_as_queries(setup):
    _, root, service = setup
    got = post(service, "/v1/search/images", {"ids": [3, 0], "k": 4}).json()
    by_features = post(service, "/v1/search/images", {"queries": np.load(root / "ims.npy")[[3, 0]].tolist(), "k": 4})
    assert got["ids"] == by_features.json()["ids"]
    np.testing.assert_allclose(got["scores"], by_features.json()["scores"], atol=1e-5)
    assert got["names"][0][0] == (root / "caps.txt").read_text().splitlines()[got["ids"][0][0]]
    for body, field in (
        ({"ids": [N]}, None),
        ({"ids": [True]}, "ids[0]"),
        ({"ids": []}, "ids"),
        ({"ids": [0], "queries": [[[0.0] * 12] * R]}, "queries"),
        ({"k": 3}, "queries"),
    ):
        r = post(service, "/v1/search/images", body)
        assert r.status_code == 422 and "error" in r.json(), body
        if field:
            assert r.json()["field"] == field, body
    assert "image id 7 is outside the gallery" in post(service, "/v1/search/images", {"ids": [N]}).json()["error"]


def test_explain_in_every_body_form_equals_the_cli(setup, capsys):
    engine, root, service = setup
    regions = np.load(root / "ims.npy")
    base = ["--engine", str(engine), "--gallery", str(root / "gal"), "--image-dir", str(root / "pictures")]
    # text -> image: the CLI's --explain --json and the endpoint give the same body (the picture: a file vs a URL)
    assert search_main([*base, "-k", "3", "--explain", "--json", "a dog on the beach ."]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    for hit in hits:
        got = post(service, "/v1/explain", {"query": "a dog on the beach .", "id": hit["id"]}).json()
        cli = hit["explanation"]
        assert got["picture"] == (f"/v1/images/{hit['id']}" if hit["id"] < 5 else None)
        assert (cli["picture"] is None) == (got["picture"] is None)
        assert {**got, "picture": None} == {**cli, "picture": None}
        assert got["image_id"] == hit["id"] and len(got["boxes"]) == R and got["regions"] == R
        assert abs(got["score"] - hit["score"]) <= 1e-5
    # image -> text: an uploaded image (JSON and .npy) as the CLI's --query-images, and a gallery image
    np.save(root / "q.npy", regions[2:3])
    assert search_main([*base, "-k", "2", "--explain", "--json", "--query-images", str(root / "q.npy")]) == 0
    for hit in json.loads(capsys.readouterr().out)[0]["results"]:
        as_json = post(service, "/v1/explain", {"queries": regions[2:3].tolist(), "id": hit["id"]}).json()
        as_npy = post(
            service, f"/v1/explain?id={hit['id']}", content=npy(regions[2:3]), headers={"Content-Type": NPY}
        ).json()
        by_id = post(service, "/v1/explain", {"image_id": 2, "id": hit["id"]}).json()
        assert as_json == as_npy == hit["explanation"]
        assert as_json["image_id"] is None and as_json["boxes"] is None and as_json["picture"] is None
        assert by_id["image_id"] == 2 and by_id["picture"] == "/v1/images/2" and len(by_id["boxes"]) == R
        assert abs(by_id["score"] - as_json["score"]) <= 1e-5 and by_id["words"] == as_json["words"]
        two_d = post(service, "/v1/explain", {"queries": regions[2].tolist(), "id": hit["id"]}).json()
        assert two_d == as_json


@pytest.mark.parametrize(
    ("body", "status", "field", "says"),
    [
        ({"query": "a dog", "id": N}, 422, None, "image id 7 is outside the gallery"),
        ({"query": "a dog", "id": -1}, 422, None, "outside the gallery"),
        ({"query": "a dog", "id": "3"}, 422, "id", "expected an integer id"),
        ({"query": "a dog", "id": 1.5}, 422, "id", "expected an integer id"),
        ({"query": "   ", "id": 0}, 422, "query", "empty caption"),
        ({"query": 3, "id": 0}, 422, "query", "expected a string"),
        ({"query": "a dog"}, 422, "id", "required field missing"),
        ({"id": 0}, 422, "body", "exactly one of query, image_id and queries"),
        ({"query": "a dog", "image_id": 0, "id": 0}, 422, "body", "exactly one of"),
        ({"image_id": N, "id": 0}, 422, None, "image id 7 is outside"),
        ({"image_id": 0, "id": M}, 422, None, "caption id 9 is outside"),
        ({"queries": [[[0.0] * 11] * R], "id": 0}, 422, None, "12"),  # the wrong img_dim
        ({"queries": [[[0.0] * 12] * R] * 2, "id": 0}, 422, "queries", "explain takes one image, received 2"),
        ({"query": "a dog", "id": 0, "k": 3}, 422, "k", "unknown field"),
    ],
)
def test_bad_explain_requests_are_4xx_json(setup, body, status, field, says):
    _, _, service = setup
    r = post(service, "/v1/explain", body)
    assert r.status_code == status and says in r.json()["error"], r.json()
    if field:
        assert r.json()["field"] == field


def test_explain_npy_errors_and_openapi(setup):
    _, _, service = setup
    npy_headers = {"Content-Type": NPY}
    # the cap on regions per image query holds here as in searches (default 100: an ONNX export fixes none)
    r = post(service, "/v1/explain?id=0", content=npy(np.zeros((1, 101, 12), np.float32)), headers=npy_headers)
    assert r.status_code == 413 and r.json()["field"] == "body", r.json()
    r = post(service, "/v1/explain", {"queries": [[[0.0] * 12] * 101], "id": 0})
    assert r.status_code == 413 and r.json()["field"] == "queries", r.json()
    r = post(service, "/v1/explain", content=npy(np.zeros((1, R, 12), np.float32)), headers=npy_headers)
    assert r.status_code == 422 and r.json()["field"] == "id"
    r = post(service, "/v1/explain?id=0", content=b"not npy", headers=npy_headers)
    assert r.status_code == 400
    r = post(service, "/v1/explain", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    paths = request(service, "GET", "/openapi.json").json()["paths"]
    assert {"/v1/explain", "/v1/images", "/v1/images/{image_id}"} <= set(paths)
    content = paths["/v1/explain"]["post"]["requestBody"]["content"]
    assert {"query", "image_id", "queries", "id"} <= set(content["application/json"]["schema"]["properties"])
    assert "application/octet-stream" in content
    search = paths["/v1/search/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "ids" in search["properties"]


def test_explain_without_a_gallery_or_an_image_folder(small_engines, tmp_path):
    engine = small_engines["t2i"]
    service = started(Service(lambda: Executor.open([engine], tmp_path / "none", EngineOptions(backend="onnxruntime"))))
    try:
        r = post(service, "/v1/explain", {"query": "a dog", "id": 0})
        assert r.status_code == 409 and "no image gallery" in r.json()["error"]
        assert request(service, "GET", "/v1/images").status_code == 409
        assert request(service, "GET", "/v1/images/0").status_code == 404
    finally:
        service.close()
