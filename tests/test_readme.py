"""The README's links to files in the repository point at files that exist (a renamed screenshot
or profile otherwise leaves a broken image or link on the project's front page)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def local_links(text: str) -> list[str]:
    return [target for target in LINK.findall(text) if not re.match(r"^[a-z]+://|^mailto:", target)]


def test_local_links_of_the_readme_exist() -> None:
    links = local_links((REPO / "README.md").read_text())
    assert "docs/viewer.jpg" in links and "config.yaml" in links
    missing = [target for target in links if not (REPO / target).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_link_finder_sees_a_broken_link() -> None:
    assert local_links("![shot](docs/none.png) [x](https://a.b/c) [y](#anchor) [z](a/b.md#part)") == ["docs/none.png", "a/b.md"]
