"""The scan report as a page a person looks at: matched faces as thumbnails per enrolled identity, a
"check these" band of near-misses, the counts, and what could not be read.

The page is one static HTML file (inline CSS; no script, font or anything else from a network) with
its thumbnails beside it in `<page stem>_files/` (small JPEGs: the face region with its box drawn),
linked by relative paths, so the page stays correct when moved together with that folder. During a
scan the thumbnails are cut while the scan has the pixels (no second decode); `write_html` makes any
that are missing (an older report, a scan without --html) by decoding only the photos it shows.
Every file name and identity is HTML-escaped: quotes, <, &, newlines and non-ASCII show as text.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from verify.atomic import atomic_write_bytes, atomic_write_text
from verify.faces import ImageLoadError, error_summary, load_for_detection, shrink

from verify.scan.report import ScanSummary, count_rows

log = logging.getLogger(__name__)

THUMB_SIDE = 128  # longest side of a thumbnail, pixels
THUMB_MARGIN = 0.25  # region around the face box, as a fraction of its side, on every side
DECODE_SIDE = 1600  # photos decoded for a missing thumbnail are shrunk to this (as the scan does)


@dataclass(frozen=True)
class PageOptions:
    near_miss: float = 0.05  # "check these": faces within this distance above their threshold
    show_unmatched: bool = False  # also show every other face (grouped by nearest identity)
    title: str = "faceverify scan report"

    def __post_init__(self) -> None:
        if not (self.near_miss >= 0 and math.isfinite(self.near_miss)):
            raise ValueError(f"near-miss margin must be a distance >= 0, got {self.near_miss}")


def files_dir(page: str | os.PathLike) -> Path:
    """The thumbnails' folder beside the page: report.html -> report_files/."""
    page = Path(page)
    return page.with_name(page.stem + "_files")


def thumbnail_name(path: str, face: int) -> str:
    """Deterministic per (photo, face): a resumed scan finds the thumbnails it already made."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{digest}_{face}.jpg"


def face_thumbnail(image: np.ndarray, box: Sequence[float], scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """The region around a face with its box drawn, at most THUMB_SIDE pixels: (h, w, 3) uint8.
    `box` is in original pixels; `image` may be shrunk by `scale` (original pixels per pixel)."""
    sx, sy = scale
    x1, y1, x2, y2 = ((box[0] + 0.5) / sx - 0.5, (box[1] + 0.5) / sy - 0.5,
                      (box[2] + 0.5) / sx - 0.5, (box[3] + 0.5) / sy - 0.5)
    m = THUMB_MARGIN * max(x2 - x1, y2 - y1)
    h, w = image.shape[:2]
    left, top = max(0, int(math.floor(x1 - m))), max(0, int(math.floor(y1 - m)))
    right, bottom = min(w, int(math.ceil(x2 + m)) + 1), min(h, int(math.ceil(y2 + m)) + 1)
    if right <= left or bottom <= top:  # a box outside the image: show the whole image
        left, top, right, bottom = 0, 0, w, h
    region, (rx, ry) = shrink(np.ascontiguousarray(image[top:bottom, left:right]), THUMB_SIDE)
    pil = Image.fromarray(region)
    line = max(1, round(min(pil.size) / 64))
    ImageDraw.Draw(pil).rectangle(((x1 - left) / rx, (y1 - top) / ry, (x2 - left) / rx, (y2 - top) / ry),
                                  outline=(0, 230, 90), width=line)
    return np.asarray(pil)


def encode_jpeg(thumb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(thumb).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def band_of(row: dict[str, Any], options: PageOptions) -> str | None:
    """Where a face row shows: "match", "near" (just over its threshold), "other" (with
    show_unmatched), or None (not shown)."""
    if row.get("status") != "face":
        return None
    if row.get("match") is True:
        return "match"
    d, t = row.get("distance"), row.get("threshold")
    if d is not None and t is not None and row.get("nearest") and d <= t + options.near_miss:
        return "near"
    return "other" if options.show_unmatched else None


def save_thumbnail(folder: Path, path: str, face: int, thumb: np.ndarray) -> None:
    """Write one thumbnail atomically, unless it is already there (a resumed scan keeps its own)."""
    target = folder / thumbnail_name(path, face)
    if not target.exists():
        atomic_write_bytes(target, encode_jpeg(thumb))


def _make_missing(folder: Path, shown: list[dict[str, Any]]) -> int:
    """Thumbnails the page needs that are not on disk: decode each such photo once. Returns how many
    could not be made (the page then shows the file name without a picture)."""
    by_photo: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in shown:
        if not (folder / thumbnail_name(r["path"], int(r["face"]))).exists():
            by_photo[r["path"]].append(r)
    failed = 0
    for path, rows in by_photo.items():
        try:
            image, scale = load_for_detection(path, DECODE_SIDE)
        except (ImageLoadError, OSError, ValueError, MemoryError) as exc:
            log.warning("%s: no thumbnail (%s)", path, error_summary(exc))
            failed += len(rows)
            continue
        for r in rows:
            box = [float(r[k]) for k in ("x1", "y1", "x2", "y2")]
            save_thumbnail(folder, path, int(r["face"]), face_thumbnail(image, box, scale))
    return failed


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}h3{font-size:15px;margin:16px 0 6px;color:#8a5a00}
.meta{color:#666;margin-bottom:16px}
section.wide h2{color:#b00020}
table.counts{border-collapse:collapse;margin:8px 0 16px}
table.counts td,table.counts th{border:1px solid #ddd;padding:4px 12px;text-align:right;background:#fff}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:150px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
figure.near{border-color:#e0a000;background:#fffaf0}
figure img{display:block;max-width:138px;max-height:138px;margin:0 auto 4px}
figcaption{font-size:12px;word-break:break-all;white-space:pre-wrap}
.num{color:#444}.none{color:#888;font-style:italic}
table.problems{border-collapse:collapse}table.problems td{border-top:1px solid #ddd;padding:3px 8px;vertical-align:top;
white-space:pre-wrap;word-break:break-all}table.problems td:first-child{white-space:nowrap;word-break:normal}
"""


def _figure(r: dict[str, Any], folder_name: str, band: str) -> str:
    path = r["path"]
    thumb = f"{folder_name}/{thumbnail_name(path, int(r['face']))}"
    try:
        link = Path(path).as_uri()
    except ValueError:
        link = ""
    far = r.get("far")
    far_text = "" if far is None else f"<br><span class=num>est. FAR {far:.1e}</span>"
    name = os.path.basename(path)
    anchor = f'<a href="{_esc(link)}">{_esc(name)}</a>' if link else _esc(name)
    d, t = r.get("distance"), r.get("threshold")
    src = f", {r['threshold_source']}" if r.get("threshold_source") else ""
    score = "no enrolled identity to compare" if d is None or t is None else f"distance {d:.4f} (threshold {t:.4f}{src})"
    return (f'<figure class="{band}" data-band="{band}"><img src="{_esc(thumb)}" alt="face {int(r["face"])}" '
            f'loading="lazy"><figcaption>{anchor}<br><span class=num>face {int(r["face"])}, {score}</span>'
            f"{far_text}</figcaption></figure>")


def render_page(rows: Sequence[dict[str, Any]], summary: ScanSummary, folder_name: str, options: PageOptions,
                source: str) -> str:
    """The page's HTML for these report rows (thumbnails referenced under `folder_name`/)."""
    bands: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    problems = []
    for r in rows:
        band = band_of(r, options)
        if band is not None:
            who = r["identity"] if band == "match" else r["nearest"] or "(no identity)"
            bands[who][band].append(r)
        if r.get("status") in ("error", "skipped"):
            problems.append(r)
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(options.title)}</title>"
             f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>",
             f"<h1>{_esc(options.title)}</h1><div class=meta>report {_esc(source)}; page made "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</div>",
             "<table class=counts><tr>"]
    counts = [("files", summary.files), ("images", summary.images), ("faces", summary.faces),
              ("matches", summary.matches), ("no face", summary.no_face), ("errors", summary.errors),
              ("skipped", summary.skipped)]
    parts.append("".join(f"<th>{k}</th>" for k, _ in counts) + "</tr><tr>")
    parts.append("".join(f'<td data-count="{k.replace(" ", "_")}">{v}</td>' for k, v in counts) + "</tr></table>")
    if not bands:
        parts.append("<p class=none>No face matched an enrolled identity, and none came close.</p>")
    for who in sorted(bands):
        groups = bands[who]
        for band in groups.values():
            band.sort(key=lambda r: (r["distance"], r["path"], r["face"]))
        matched = groups.get("match", [])
        parts.append(f'<section data-identity="{_esc(who)}"><h2>{_esc(who)}: {len(matched)} matched '
                     f'face{"" if len(matched) == 1 else "s"}</h2>')
        parts.append('<div class="grid matches">' + "".join(_figure(r, folder_name, "match") for r in matched)
                     + "</div>" if matched else "<p class=none>no matched face</p>")
        if groups.get("near"):
            parts.append(f"<h3>Check these: {len(groups['near'])} near-miss(es), within {options.near_miss:g} "
                         "of the threshold</h3>")
            parts.append('<div class="grid near">' + "".join(_figure(r, folder_name, "near") for r in groups["near"])
                         + "</div>")
        if groups.get("other"):
            parts.append(f"<h3>Other faces nearest {_esc(who)}</h3><div class=\"grid other\">"
                         + "".join(_figure(r, folder_name, "other") for r in groups["other"]) + "</div>")
        parts.append("</section>")
    parts.append(f"<h2>Errors and skipped files: {len(problems)}</h2>")
    if problems:
        parts.append("<table class=problems>" + "".join(
            f'<tr data-status="{_esc(r["status"])}"><td>{_esc(r["status"])}</td><td>{_esc(r["path"])}</td>'
            f"<td>{_esc(r.get('error'))}</td></tr>" for r in problems) + "</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(rows: Iterable[dict[str, Any]], page: str | os.PathLike, *, options: PageOptions | None = None,
               source: str = "") -> ScanSummary:
    """Write the page for report rows (as `write_report` takes them) to `page`, atomically, making
    any thumbnail it shows that is not in `files_dir(page)` yet. Returns the counts it shows."""
    options = options or PageOptions()
    page = Path(page)
    rows = list(rows)
    summary = ScanSummary(report=page)
    for _ in count_rows(summary, rows):
        pass
    folder = files_dir(page)
    shown = [r for r in rows if band_of(r, options) is not None]
    if shown:
        folder.mkdir(parents=True, exist_ok=True)
        failed = _make_missing(folder, shown)
        if failed:
            log.warning("%s: %d face(s) shown without a thumbnail (photo unreadable now)", page, failed)
    atomic_write_text(page, render_page(rows, summary, folder.name, options, source))
    log.info("%s: %d faces shown (%d matched), thumbnails in %s", page, len(shown), summary.matches, folder)
    return summary


def write_groups_html(rows: Sequence[dict[str, Any]], page: str | os.PathLike, *, max_per_group: int = 24,
                      source: str = "", excluded: Sequence[dict[str, Any]] = (), spread: dict[int, float] | None = None,
                      quality: dict[int, float] | None = None, min_quality: float | None = None) -> int:
    """The page of `faceverify people`: one row of thumbnails per group of unknown faces (rows: group,
    size, path, face, x1..y2, quality), largest group first, then the better mean quality, each headed
    by its spread (mean distance of its faces from its centre: a mixed group stands out) and mean
    quality; then the faces left out for low quality (`excluded`) in a band of their own.
    Returns the number of groups shown."""
    page = Path(page)
    folder = files_dir(page)
    by_group: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_group[int(r["group"])].append(r)
    quality = quality or {}
    spread = spread or {}
    order = sorted(by_group, key=lambda g: (-len(by_group[g]), -quality.get(g, 0.0), g))
    shown = [r for g in order for r in by_group[g][:max_per_group]] + list(excluded[:max_per_group])
    if shown:
        folder.mkdir(parents=True, exist_ok=True)
        _make_missing(folder, shown)
    typical = float(np.median(list(spread.values()))) if spread else None
    title = "faceverify: unknown people"
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{title}</title>"
             f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>",
             f"<h1>{title}</h1><div class=meta>index {_esc(source)}; {len(order)} group(s) of faces that match "
             f"nobody enrolled; {len(excluded)} face(s) left out for quality below {min_quality or 0:.2f}; "
             f"enroll a group with <code>faceverify enroll NAME --group ID</code>; page made "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</div>"]
    if not order:
        parts.append("<p class=none>No group: too few unknown faces look alike.</p>")

    def figure(r: dict[str, Any]) -> str:
        thumb = f"{folder.name}/{thumbnail_name(r['path'], int(r['face']))}"
        q = r.get("quality")
        q_text = "" if q is None or q != q else f", quality {q:.2f}"
        return (f'<figure class="group"><img src="{_esc(thumb)}" alt="face {int(r["face"])}" loading="lazy">'
                f"<figcaption>{_esc(os.path.basename(r['path']))}<br><span class=num>face {int(r['face'])}"
                f"{q_text}</span></figcaption></figure>")

    for g in order:
        members = by_group[g]
        sp = spread.get(g)
        # a group twice as spread as the page's typical one is likely two people: say so
        wide = sp is not None and typical is not None and len(order) > 2 and sp > 1.5 * typical
        head = f"group {g}: {len(members)} faces"
        if sp is not None:
            head += f", spread {sp:.2f}" + (" (wide: check for a second person)" if wide else "")
        if g in quality:
            head += f", quality {quality[g]:.2f}"
        parts.append(f'<section data-group="{g}"' + (' class="wide"' if wide else "") +
                     f'><h2>{_esc(head)}</h2><div class="grid group">')
        parts += [figure(r) for r in members[:max_per_group]]
        if len(members) > max_per_group:
            parts.append(f"<p class=none>and {len(members) - max_per_group} more</p>")
        parts.append("</div></section>")
    if excluded:
        parts.append(f'<section data-group="excluded"><h2>left out for low quality: {len(excluded)} faces '
                     f"(quality below {min_quality or 0:.2f}; worst first; lower --min-quality to group them)</h2>"
                     '<div class="grid group">')
        parts += [figure(r) for r in excluded[:max_per_group]]
        if len(excluded) > max_per_group:
            parts.append(f"<p class=none>and {len(excluded) - max_per_group} more</p>")
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    atomic_write_text(page, "".join(parts))
    return len(order)
