"""The links of the README and of the pages under docs/ point at files and headings that exist (a
renamed screenshot, profile or page otherwise leaves a broken image or link on the project's front
page), and every docs page is reachable from the README."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
ANCHORED_LINK = re.compile(r"\]\(([^)#\s]*)#([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def local_links(text: str) -> list[str]:
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z]+://|^mailto:", target)]


def docs_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def missing_targets(page: Path) -> list[str]:
    """Local link targets of a page that do not exist, resolved relative to the page's own folder."""
    return [target for target in local_links(page.read_text()) if not (page.parent / target).exists()]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ... (headings inside fenced code are not headings)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = None if in_fence else HEADING.match(line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_anchors(page: Path) -> list[str]:
    """Links of a page to a heading (`#part`, `page.md#part`) whose target page has no such heading.
    Targets that are not Markdown pages, and pages that do not exist yet, are left to the file checks."""
    broken = []
    for target, anchor in ANCHORED_LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target) or (target and not target.endswith(".md")):
            continue
        linked = page if not target else page.parent / target
        if linked.exists() and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}#{anchor}")
    return broken


def test_local_links_of_the_readme_exist() -> None:
    links = local_links((REPO / "README.md").read_text())
    assert "docs/viewer.jpg" in links and "config.yaml" in links
    missing = missing_targets(REPO / "README.md")
    assert not missing, f"README links to missing files: {missing}"


def test_local_links_of_every_docs_page_exist() -> None:
    assert docs_pages(), "docs/ holds no Markdown pages"
    missing = {page.name: missing_targets(page) for page in docs_pages()}
    missing = {name: targets for name, targets in missing.items() if targets}
    assert not missing, f"docs pages link to missing files: {missing}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / target).resolve() for target in local_links((REPO / "README.md").read_text())}
    unlinked = [page.name for page in docs_pages() if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_links_to_headings_find_their_heading() -> None:
    broken = {page.name: broken_anchors(page) for page in [REPO / "README.md", *docs_pages()]}
    broken = {name: targets for name, targets in broken.items() if targets}
    assert not broken, f"links to headings that do not exist: {broken}"


def test_the_link_finder_sees_a_broken_link() -> None:
    assert local_links("![shot](docs/none.png) [x](https://a.b/c) [y](#anchor) [z](a/b.md#part)") == ["docs/none.png", "a/b.md"]


def test_the_anchor_finder_follows_github() -> None:
    text = "# Title\n\n## Fine maps and honest colours\n\n```bash\n# not a heading\n```\n\n## The viewer (`report/viewer.html`)\n\n## Title\n"
    assert anchors(text) == {"title", "fine-maps-and-honest-colours", "the-viewer-reportviewerhtml", "title-1"}


def test_license_and_citation_match_the_package() -> None:
    import yaml

    from wsi_asmil import __version__

    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["version"] == __version__ and citation["license"] == "MIT"
    assert "ASMIL" in citation["references"][0]["title"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert 'license = "MIT"' in (REPO / "pyproject.toml").read_text()
