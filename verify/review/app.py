"""The review app (Starlette): a thin reader and writer of the library index and the gallery.

It keeps no state of its own: every request opens the index (WAL: a scan may be writing it) and the
gallery, and every decision is one SQLite transaction committed before the answer goes out, so a
decision acknowledged survives a kill -9. Security:
  - every request, images included, carries the session token (query `token`, or header X-Token;
    POST only by the header): none -> 401, a wrong one -> 403;
  - state changes only by POST (a link or an image on another site cannot make one);
  - photos and thumbnails are served by file or face id from the index only: no request parameter or
    path reaches the file system; anything else is 404;
  - every name and path on a page is escaped; a Content-Security-Policy allows only our own script;
  - the app never writes a photo (it writes the index's decisions and the gallery).
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from index import Gallery, GalleryError
from index.library import Library, LibraryError

from verify.review import pages

if TYPE_CHECKING:
    from verify.faces import FacePipeline

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
# A person's page narrows the faces to match by a range search from this many faces on; below it,
# matching every face is cheaper than the search's fixed cost (measured: 100 faces 0.004 s vs 0.07 s,
# 1,000 faces 0.07 s vs 0.14 s; 5,739 LFW faces 1.1 s vs 0.2 s).
NARROW_FROM_FACES = 2000
IMAGE_MAX_SIDE = 2048  # a photo page's picture: enough for the boxes, not the original file


@dataclass
class ReviewSource:
    """Where the app reads and writes: the index, the gallery, and the model that confirmed faces are
    embedded with (loaded on the first confirm)."""

    index: Path
    gallery: Path
    model: Path | None = None
    near_miss: float = 0.05  # near misses: within this distance above a person's threshold
    n_views: int = 8  # augmented views per confirmed face (as enroll)
    device: str = "cpu"
    runtime: str = "auto"
    _pipeline: "FacePipeline | None" = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def library(self) -> Library:
        return Library.open(self.index, create=False)

    def open_gallery(self, create: bool = False) -> Gallery | None:
        from verify.identity.galleries import open_gallery

        if create:
            return open_gallery(self.gallery, self.pipeline().embedder, create=True)
        if not (self.gallery / "manifest.json").exists():
            return None
        return open_gallery(self.gallery, None)

    def pipeline(self) -> "FacePipeline":
        """Detector and embedder for confirmed faces' augmented views (once per app)."""
        with self._lock:
            if self._pipeline is None:
                from verify.identity.enroll import face_pipeline
                from verify.model.runtimes import load_embedder

                embedder = load_embedder(self.model, self.device, self.runtime)
                self._pipeline = face_pipeline(embedder, self.device, 40, 0.95, self.runtime)
            return self._pipeline


def model_of(library: Library, gallery: Gallery | None) -> str:
    """The gallery's model, else the index's model with the most embeddings."""
    if gallery is not None:
        return gallery.fingerprint
    models = library.models()
    if not models:
        raise LibraryError(f"{library.path}: no embedded face yet; run faceverify scan first")
    return max(models, key=models.get)


def face_rows(library: Library, gallery: Gallery | None, *, person: str | None = None, near_miss: float = 0.0,
              file_id: int | None = None) -> list[dict[str, Any]]:
    """The report rows of the present faces (decisions applied), with their face and file ids: every
    face; with `person`, only the photos that can hold one of their matches or near misses (a range
    search of their pooled photos at threshold - `near_miss`, as `find NAME` narrows its answer, plus
    the faces confirmed as them); with `file_id`, that photo's faces."""
    from verify.identity.decisions import Verdicts
    from verify.identity.scoring import IdentityMatcher
    from verify.identity.galleries import build_matcher
    from verify.queries.find import candidate_faces
    from verify.scan.indexed import find_rows

    model = model_of(library, gallery)
    matcher = build_matcher(gallery) if gallery is not None and len(gallery) else IdentityMatcher({}, {}, 1.0)
    verdicts = Verdicts.load(library, model)
    only = None
    if person is not None and library.face_count() >= NARROW_FROM_FACES:
        found = candidate_faces(library, model, matcher, [person], widen=near_miss)
        only = np.union1d(found, np.asarray(verdicts.confirmed_face_ids([person]), np.int64))
    elif file_id is not None:
        only = list(library.face_ids([file_id]).values())
    rows = [r for r in find_rows(library, model, matcher, only_faces=only, verdicts=verdicts) if r["status"] == "face"]
    file_ids = {p: s.id for p, s in library.files({r["path"] for r in rows}, present_only=True).items()}
    face_ids = library.face_ids(list(file_ids.values()))
    for r in rows:
        r["face_id"] = face_ids.get((r["path"], int(r["face"])))
        r["file_id"] = file_ids.get(r["path"])
    return [r for r in rows if r["face_id"] is not None]


def _distance_key(r: dict) -> float:
    d = r.get("distance")
    return -math.inf if d is None or (isinstance(d, float) and math.isnan(d)) else float(d)


def person_faces(rows: list[dict], name: str, near_miss: float) -> tuple[list[dict], list[dict]]:
    """(faces matched to `name`, best first; near misses: nearest `name`, not matched, within
    `near_miss` above the threshold, closest first)."""
    matched = sorted((r for r in rows if r["match"] and r["identity"] == name), key=_distance_key)
    near = sorted((r for r in rows if not r["match"] and r["nearest"] == name and r["distance"] is not None
                   and r["threshold"] is not None and r["distance"] <= r["threshold"] + near_miss), key=_distance_key)
    return matched, near


class TokenGate:
    """ASGI middleware: every HTTP request needs the token (401 without, 403 with a wrong one)."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-token")
        if given is None and scope["method"] in ("GET", "HEAD"):
            values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            given = values[0].encode() if values else None
        if given is None:
            response: Response = PlainTextResponse("401: this page needs the token printed by faceverify review",
                                                   status_code=401)
        elif not secrets.compare_digest(given, self.token):
            response = PlainTextResponse("403: wrong token", status_code=403)
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _security_headers(response: Response, nonce: str | None = None) -> Response:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; img-src 'self'; style-src {script}; script-src {script}; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store" if nonce else "private, max-age=600"
    return response


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(source: ReviewSource, token: str, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app over `source`; `token`: the session's secret; `allowed_hosts`: Host headers accepted
    (loopback names by default: a DNS-rebinding page cannot reach the app)."""
    routes = [
        Route("/", home, methods=["GET"]),
        Route("/person", person, methods=["GET"]),
        Route("/groups", groups, methods=["GET"]),
        Route("/photo/{file_id:int}", photo, methods=["GET"]),
        Route("/thumb/{face_id:int}", thumb, methods=["GET"]),
        Route("/image/{file_id:int}", image, methods=["GET"]),
        Route("/decisions", decisions, methods=["GET"]),
        Route("/decide", decide, methods=["POST"]),
        Route("/undo", undo, methods=["POST"]),
        Route("/name", name_faces, methods=["POST"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS),
                  Middleware(TokenGate, token=token)]
    app = Starlette(routes=routes, middleware=middleware)
    # the handlers below read these; the token goes into the pages' links
    app.state.source, app.state.token = source, token
    return app


# --------------------------------------------------------------------------------------------
# Helpers of the handlers
# --------------------------------------------------------------------------------------------


def _source(request: Request) -> ReviewSource:
    return request.app.state.source


def _token(request: Request) -> str:
    return request.app.state.token


def _html(render: Callable[[str], str]) -> Response:
    """The page `render(nonce)` makes, with its security headers; 503 when the index or gallery fails."""
    nonce = secrets.token_urlsafe(12)
    try:
        return _security_headers(HTMLResponse(render(nonce)), nonce)
    except (LibraryError, GalleryError) as e:
        return _security_headers(PlainTextResponse(str(e), status_code=503))


def _not_found(message: str) -> Response:
    return _security_headers(PlainTextResponse(message, status_code=404))


def _jpeg(data: bytes) -> Response:
    return _security_headers(Response(data, media_type="image/jpeg"))


@contextmanager
def _opened(source: ReviewSource) -> Iterator[tuple[Library, Gallery | None]]:
    """The index and the gallery (None before anyone is enrolled); the index is closed on the way out."""
    with source.library() as lib:
        yield lib, source.open_gallery()


async def _body_of(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ValueError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the request body is not a JSON object")
    return body


# --------------------------------------------------------------------------------------------
# Pages (GET): they read, never write
# --------------------------------------------------------------------------------------------


def home(request: Request) -> Response:
    source, token = _source(request), _token(request)

    def render(nonce: str) -> str:
        with _opened(source) as (lib, g):
            rows = face_rows(lib, g)
            names = sorted(set(g.identities()["identity"])) if g is not None else []
            people = [(n, *map(len, person_faces(rows, n, source.near_miss))) for n in names]
            return pages.index_page(people, None, token, nonce, str(lib.path))
    return _html(render)


def person(request: Request) -> Response:
    source, token = _source(request), _token(request)
    name = request.query_params.get("name", "")

    def render(nonce: str) -> str:
        with _opened(source) as (lib, g):
            if g is None or name not in set(g.identities()["identity"]):
                raise KeyError(name)
            rows = face_rows(lib, g, person=name, near_miss=source.near_miss)
            matched, near = person_faces(rows, name, source.near_miss)
            return pages.person_page(name, matched, near, token, nonce)
    try:
        return _html(render)
    except KeyError:
        return _not_found("404: nobody of that name is enrolled")


def groups(request: Request) -> Response:
    from verify.queries.people import unknown_people

    source, token = _source(request), _token(request)

    def render(nonce: str) -> str:
        with _opened(source) as (lib, g):
            model = model_of(lib, g)
            # shown, not saved: a GET changes nothing in the index
            result = unknown_people(lib, g if g is not None and len(g) else None, model, save=False)
            where = lib.face_locations([f for m in result.groups.values() for f in m])
            file_ids = {p: s.id for p, s in lib.files({w[0] for w in where.values()}).items()}
            shown = []
            for gid in sorted(result.groups, key=lambda k: -len(result.groups[k])):
                rows = []
                for f in result.groups[gid]:
                    path, _, k, rec, _ = where[f]
                    rows.append({"face_id": f, "file_id": file_ids[path], "face": k, "path": path,
                                 "distance": None, "note": None})
                shown.append((gid, rows))
            return pages.groups_page(shown, result.faces_considered, token, nonce)
    return _html(render)


def photo(request: Request) -> Response:
    source, token = _source(request), _token(request)
    file_id = request.path_params["file_id"]

    def render(nonce: str) -> str:
        from verify.faces import ImageLoadError, load_image

        with _opened(source) as (lib, g):
            stored = lib.file_by_id(file_id)
            if stored is None or not stored.present:
                raise KeyError(file_id)
            try:
                h, w = load_image(stored.fs_path).shape[:2]
            except ImageLoadError as e:
                raise KeyError(str(e)) from None
            rows = [r for r in face_rows(lib, g, file_id=stored.id) if r["file_id"] == stored.id]
            return pages.photo_page(stored.path, (w, h), rows, stored.id, token, nonce)
    try:
        return _html(render)
    except KeyError:
        return _not_found("404: no such photo in the index")


def thumb(request: Request) -> Response:
    from verify.faces import ImageLoadError, load_image
    from verify.scan.html import encode_jpeg, face_thumbnail

    with _source(request).library() as lib:
        where = lib.face_locations([request.path_params["face_id"]]).get(request.path_params["face_id"])
    if where is None:
        return _not_found("404: no such face in the index")
    _, fs_path, _, rec, _ = where
    try:
        pixels = load_image(fs_path)  # (H, W, 3), the pixels the box was found in
    except ImageLoadError:
        return _not_found("404: the photo cannot be read now")
    return _jpeg(encode_jpeg(face_thumbnail(pixels, rec.box)))


def image(request: Request) -> Response:
    from verify.faces import ImageLoadError, load_image, shrink
    from verify.scan.html import encode_jpeg

    with _source(request).library() as lib:
        stored = lib.file_by_id(request.path_params["file_id"])
    if stored is None or not stored.present:
        return _not_found("404: no such photo in the index")
    try:
        pixels, _ = shrink(load_image(stored.fs_path), IMAGE_MAX_SIDE)
    except ImageLoadError:
        return _not_found("404: the photo cannot be read now")
    return _jpeg(encode_jpeg(pixels))


def decisions(request: Request) -> Response:
    from verify.identity.decisions import face_gone

    source, token = _source(request), _token(request)

    def render(nonce: str) -> str:
        with source.library() as lib:
            return pages.decisions_page(lib.decisions(), face_gone(lib), token, nonce)
    return _html(render)


# --------------------------------------------------------------------------------------------
# Decisions (POST): the checks of the request here, the transaction in a worker thread
# --------------------------------------------------------------------------------------------


async def decide(request: Request) -> Response:
    try:
        body = await _body_of(request)
        face_id, kind, name = int(body["face_id"]), str(body["kind"]), body.get("name")
    except (KeyError, TypeError, ValueError) as e:
        return _error(400, f"bad request ({e})")
    if kind not in ("confirm", "reject", "ignore"):
        return _error(400, f"unknown decision {kind!r}")
    if kind != "ignore" and not (isinstance(name, str) and name.strip()):
        return _error(400, f"a {kind} needs a name")
    return await run_in_threadpool(_decide, _source(request), face_id, kind, name if kind != "ignore" else None)


def _decide(source: ReviewSource, face_id: int, kind: str, name: str | None) -> Response:
    from verify.identity.decisions import enroll_faces, locate_face_id, record_decision

    try:
        with source.library() as lib:
            about = locate_face_id(lib, face_id)
            (decision,) = record_decision(lib, kind, [about], name, "review")
        added = 0
        if kind == "confirm":  # the decision stands already; the gallery follows it
            g = source.open_gallery(create=True)
            added = enroll_faces(g, name, [about], source.pipeline(), n_views=source.n_views).vectors_added
    except ValueError as e:
        return _error(404, str(e))
    except (LibraryError, GalleryError) as e:
        return _error(503, str(e))
    return JSONResponse({"decision": decision, "vectors_added": added})


async def undo(request: Request) -> Response:
    try:
        decision = int((await _body_of(request))["decision"])
    except (KeyError, TypeError, ValueError) as e:
        return _error(400, f"bad request ({e})")
    return await run_in_threadpool(_undo, _source(request), decision)


def _undo(source: ReviewSource, decision: int) -> Response:
    from verify.identity.decisions import undo as undo_decision

    try:
        with source.library() as lib:
            target = next((d for d in lib.decisions() if d.id == decision), None)
            confirm = target is not None and target.kind == "confirm"
            g = source.open_gallery() if confirm else None
            undo_decision(lib, decision, "review", g, source.pipeline().embedder if confirm and g else None)
    except (LibraryError, GalleryError) as e:
        return _error(409 if "decision" in str(e) else 503, str(e))
    return JSONResponse({"undone": decision})


async def name_faces(request: Request) -> Response:
    try:
        body = await _body_of(request)
        name, face_ids = str(body["name"]).strip(), [int(f) for f in body["face_ids"]]
    except (KeyError, TypeError, ValueError) as e:
        return _error(400, f"bad request ({e})")
    if not name or not face_ids:
        return _error(400, "a name and at least one face are needed")
    return await run_in_threadpool(_name, _source(request), name, face_ids)


def _name(source: ReviewSource, name: str, face_ids: list[int]) -> Response:
    """Name the faces of a group the user has seen: enroll them (as enroll --group), leave out the
    ones the outlier check flags, and keep the rest as confirm decisions (one transaction)."""
    from verify.identity.decisions import enroll_faces, locate_face_id, record_decision, remove_photo

    try:
        with source.library() as lib:
            about = []
            for f in face_ids:
                try:
                    about.append(locate_face_id(lib, f))
                except ValueError:
                    continue  # gone since the page was made
            if not about:
                return _error(404, "none of these faces is in the index now")
            g = source.open_gallery(create=True)
            pipeline = source.pipeline()
            r = enroll_faces(g, name, about, pipeline, n_views=source.n_views)
            flagged = {src for src, _ in r.outliers}
            left_out = [a for a in about if a.stored.fs_path in flagged]
            for a in left_out:
                remove_photo(g, name, a.stored.sha256, pipeline.embedder)
            kept = [a for a in about if a.stored.fs_path not in flagged]
            ids = record_decision(lib, "confirm", kept, name, "review:group") if kept else []
    except (LibraryError, GalleryError) as e:
        return _error(503, str(e))
    except ValueError as e:
        return _error(400, str(e))
    return JSONResponse({"named": len(kept), "decisions": ids, "left_out": [a.stored.path for a in left_out]})
