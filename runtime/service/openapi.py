"""The service's OpenAPI description and ``/docs``, a page that renders it with nothing from the network.

The schemas document the bodies; runtime/service/requests.py parses and checks them (the handlers read raw
bodies, so these models validate nothing).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from runtime.service.requests import DEFAULT_K, NPY
from runtime.service.settings import Limits


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong; it starts with the field at fault")
    field: str | None = Field(
        None,
        description="the input at fault: a body field (queries, queries[3], k, features, names[0], captions[2]), "
        "body, Content-Type or Authorization",
    )
    limit: int | None = Field(None, description="the limit that was exceeded")
    received: Any = Field(None, description="what was received: a count, a number, or a JSON type's name")
    committed: str | None = Field(None, description='"unknown" when a write may or may not have committed (504)')


class SearchResults(BaseModel):
    ids: list[list[int]] = Field(description="per query, the top-k gallery ids, best first; -1 past the gallery's end")
    scores: list[list[float | None]] = Field(description="their similarities; null past the gallery's end")
    names: list[list[str | None]] = Field(
        description="the image names (text search) or caption texts (image search); null without names"
    )


class AppendResult(BaseModel):
    added: int = Field(description="items this request appended")
    ids: list[int] = Field(description="the ids they got, consecutive")
    count: int = Field(description="items in the gallery now")


ERRORS = {
    400: "malformed body: not JSON, not an .npy array, or an .npy header that does not match the body",
    401: "missing or wrong token (gallery writes, when the server has one)",
    408: "the body did not arrive within the server's body timeout",
    409: "no gallery for that direction yet, or an append that conflicts with the gallery (names)",
    413: "too large: the body, or too many queries, items, regions per image or characters",
    415: "wrong Content-Type",
    422: "an invalid value (the field is named)",
    500: "an internal failure of this request, or a corrupted gallery (logged by the server)",
    503: "not ready, overloaded or shutting down (Retry-After says when to retry)",
    504: 'a write whose outcome is unknown ("committed": "unknown"): check before retrying',
    507: "the server's disk is full (nothing of the write remains)",
}


def responses(ok: type[BaseModel], *codes: int) -> dict[int | str, dict[str, Any]]:
    """The responses of an operation: ``ok`` for 200 and an ``ErrorBody`` for each of ``codes``."""
    out: dict[int | str, dict[str, Any]] = {200: {"model": ok}}
    out.update({code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes})
    return out


def regions_schema(limits: Limits, what: str) -> dict[str, Any]:
    return {
        "type": "array",
        "description": f"{what}: region features, one (regions, img_dim) array of numbers per image "
        f"(img_dim: the model's, in GET /v1/info model.config; regions per image: at most limits.max_regions)",
        "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    }


def operation(
    limits: Limits, required: str, properties: dict[str, Any], npy: str | None = None, query: tuple[str, ...] = ()
) -> dict[str, Any]:
    """An operation's request body (JSON with ``properties``, ``required`` among them; with ``npy``, its
    description, a raw .npy body too) and its query parameters (``k`` and ``names`` go with an .npy body)."""
    content: dict[str, Any] = {
        "application/json": {
            "schema": {
                "type": "object",
                "required": [required],
                "properties": properties,
                "additionalProperties": False,
            }
        }
    }
    if npy is not None:
        content[NPY] = {"schema": {"type": "string", "format": "binary", "description": npy}}
    parameters = {
        "k": {"schema": k_schema(limits), "description": "results per query, with an .npy body"},
        "names": {
            "schema": {"type": "string", "example": '["a.jpg","b.jpg"]'},
            "description": "with an .npy body: the images' names, a JSON array of strings",
        },
    }
    return {
        "requestBody": {"required": True, "content": content},
        "parameters": [{"name": name, "in": "query", "required": False, **parameters[name]} for name in query],
    }


def k_schema(limits: Limits) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": DEFAULT_K}


def captions_schema(limit: int, limits: Limits) -> dict[str, Any]:
    return {
        "type": "array",
        "minItems": 1,
        "maxItems": limit,
        "items": {"type": "string", "minLength": 1, "maxLength": limits.max_caption_chars},
    }


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SCAN search: API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2rem;font-size:1.1rem}code,pre{font:13px ui-monospace,monospace;background:#f4f4f4}
pre{padding:.6rem;overflow-x:auto}.m{font-weight:bold;text-transform:uppercase;margin-right:.5rem}
td{vertical-align:top;padding:.1rem .6rem .1rem 0}
</style></head><body>
<h1 id="title">API</h1><p id="about"></p>
<p>The machine-readable description: <a href="openapi.json">openapi.json</a>. This page loads nothing else.</p>
<div id="ops"></div>
<script>
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
fetch("openapi.json").then(r => r.json()).then(spec => {
  const refs = spec.components ? spec.components.schemas : {};
  const resolve = s => s && s.$ref ? refs[s.$ref.split("/").pop()] : s;
  const show = s => "<pre>" + esc(JSON.stringify(resolve(s), null, 1)) + "</pre>";
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("about").textContent = spec.info.description || "";
  let html = "";
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      html += `<h2><span class="m">${esc(method)}</span><code>${esc(path)}</code></h2><p>${esc(op.summary || "")}</p>`;
      if (op.parameters && op.parameters.length) {
        html += "<h3>Query parameters</h3><table>" + op.parameters.map(p =>
          `<tr><td><code>${esc(p.name)}</code></td><td>${esc(p.description || "")}</td>
           <td><code>${esc(JSON.stringify(p.schema))}</code></td></tr>`).join("") + "</table>";
      }
      if (op.requestBody) {
        for (const [type, c] of Object.entries(op.requestBody.content)) {
          html += `<h3>Body: ${esc(type)}</h3>` + show(c.schema);
        }
      }
      html += "<h3>Responses</h3><table>";
      for (const [code, r] of Object.entries(op.responses || {})) {
        const c = r.content && r.content["application/json"];
        html += `<tr><td><b>${esc(code)}</b></td><td>${esc(r.description || "")}${c ? show(c.schema) : ""}</td></tr>`;
      }
      html += "</table>";
    }
  }
  document.getElementById("ops").innerHTML = html;
});
</script></body></html>
"""
