"""Every relative link in README.md, docs/*.md and docs/models/*.md resolves: the file exists, and a
`#anchor` names a heading (GitHub's slugs) or an explicit `<a id=...>` of the page it points to.

Links in fenced code blocks and inline code are not links; http(s), mailto and other schemes are not
checked (no network in tests).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_pages(root: Path) -> list[Path]:
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "docs" / "models").glob("*.md"))]
    return [p for p in pages if p.is_file()]


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (their brackets are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page offers: heading slugs (repeats get -1, -2, ... as on GitHub) and <a id/name>."""
    text = page.read_text(encoding="utf-8")
    out: set[str] = set(_HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, root: Path) -> list[str]:
    """'PAGE: TARGET (why)' for each relative link of `page` that does not resolve."""
    text = _prose(page.read_text(encoding="utf-8"))
    problems = []
    for target in [*_INLINE.findall(text), *_REFERENCE.findall(text)]:
        if _SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, anchor = target.partition("#")
        dest = page if not path_part else (page.parent / unquote(path_part)).resolve()
        where = f"{page.relative_to(root)}: {target}"
        if path_part and not (dest == root or root in dest.parents):
            problems.append(f"{where} (outside the repository)")
        elif not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where} (no heading #{anchor} in {dest.name})")
    return problems


def test_checker_finds_missing_files_and_anchors_and_ignores_code(tmp_path):
    (tmp_path / "docs" / "models").mkdir(parents=True)
    (tmp_path / "docs" / "scale.md").write_text("# Scale\n\n## Search at 1e7 faces\n\n## Search at 1e7 faces\n"
                                                '<a id="by-hand"></a>\n')
    (tmp_path / "docs" / "models" / "old.md").write_text("# Old card\n\n[back](../../README.md#quick-start)\n")
    (tmp_path / "README.md").write_text(
        "# faceverify\n\n## Quick start\n\n"
        "[ok](docs/scale.md) [ok anchor](docs/scale.md#search-at-1e7-faces) [repeat](docs/scale.md#search-at-1e7-faces-1)\n"
        "[by hand](docs/scale.md#by-hand) [here](#quick-start) [web](https://example.org/nowhere.md)\n"
        "[missing](docs/benchmarks.md) [bad anchor](docs/scale.md#search-at-1e8-faces) [bad here](#install)\n"
        "![image](docs/missing.png)\n[ref]: docs/data.md\n"
        "`[code](docs/nope.md)`\n\n```\n[fenced](docs/nope.md)\n```\n")
    pages = doc_pages(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in pages] == ["README.md", "docs/scale.md", "docs/models/old.md"]
    problems = [msg for p in pages for msg in broken_links(p, tmp_path)]
    assert problems == [
        "README.md: docs/benchmarks.md (no such file)",
        "README.md: docs/scale.md#search-at-1e8-faces (no heading #search-at-1e8-faces in scale.md)",
        "README.md: #install (no heading #install in README.md)",
        "README.md: docs/missing.png (no such file)",
        "README.md: docs/data.md (no such file)",
    ]


def test_slug_follows_github():
    assert slug("Search at scale (1e7 faces)") == "search-at-scale-1e7-faces"
    assert slug("`faceverify find NAME`: who is where") == "faceverify-find-name-who-is-where"
    assert slug("The [model card](docs/model-card.md)") == "the-model-card"
    assert slug("Speed & memory") == "speed--memory"


@pytest.mark.parametrize("page", doc_pages(REPO), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page, REPO) == []
