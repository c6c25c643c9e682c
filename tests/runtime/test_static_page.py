"""The search page's files (runtime/service/static/): self-contained, and what API.md promises a test can find."""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "runtime" / "service" / "static"


def test_the_page_loads_nothing_from_elsewhere():
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text(encoding="utf-8")
        # SVG's XML namespace is a name, not a fetch
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text) if "www.w3.org/2000/svg" not in u]
        assert not urls, f"{name} refers to {urls}"
        assert "@import" not in text and "import(" not in text


def test_index_refers_to_its_own_files_and_the_elements_api_md_names():
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert (STATIC / ref.removeprefix("static/")).is_file(), ref
    for element in ('id="hits"', 'id="caption-hits"', 'id="status"', 'id="explain"', 'name="viewport"'):
        assert element in html
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    for call in ("/v1/search/text", "/v1/search/images", "/v1/explain", "/v1/info", "/v1/images"):
        assert call in js and call in (STATIC / "API.md").read_text(encoding="utf-8")
    assert '"data-id"' in js and "textContent" in js and "innerHTML" not in js
