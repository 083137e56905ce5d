"""The documentation holds together: every relative link in README.md and docs/*.md points at a file that
exists, the README stays a short front door, and it links every page in docs/."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300

#: ``[text](target)`` and ``![alt](target)``, with an optional title; the text may hold one level of brackets
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
#: ``[label]: target`` (reference-style link definitions)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
#: inline code spans (one or more backticks, not across a blank line)
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?(?<!`)\1(?!`)", re.S)
EXTERNAL = ("http://", "https://", "mailto:")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are code, not links."""
    kept, fence = [], None
    for line in text.split("\n"):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        kept.append(line)
    return CODE_SPAN.sub("", "\n".join(kept))


def link_targets(text: str) -> list[str]:
    """Every link target in markdown ``text``, in order (inline links, images, reference definitions)."""
    body = prose(text)
    targets = [m.group(1) for m in INLINE_LINK.finditer(body)]
    targets += [m.group(1) for m in REFERENCE_DEFINITION.finditer(body)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in targets]


def local_path(target: str, source: Path) -> Path | None:
    """The file a relative link points at, or None for external links and pure ``#anchor`` links."""
    if target.lower().startswith(EXTERNAL) or target.startswith("#"):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    if not path:
        return None
    base = ROOT if path.startswith("/") else source.parent
    return (base / path.lstrip("/")).resolve()


def broken_links(source: Path) -> list[str]:
    """The relative links of ``source`` whose file does not exist, as ``target (-> path)``."""
    broken = []
    for target in link_targets(source.read_text(encoding="utf-8")):
        path = local_path(target, source)
        if path is not None and not path.exists():
            broken.append(f"{target} (-> {path})")
    return broken


def linked_files(source: Path) -> set[Path]:
    paths = (local_path(t, source) for t in link_targets(source.read_text(encoding="utf-8")))
    return {p for p in paths if p is not None}


def test_the_documentation_exists():
    assert README.is_file()
    assert list(DOCS.glob("*.md")), "docs/ holds no pages"


@pytest.mark.parametrize("source", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(source: Path):
    broken = broken_links(source)
    assert not broken, f"{source.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, (f"README.md has {count} lines; keep it at most {README_MAX_LINES} and move "
                                       "reference material to a page in docs/")


def test_readme_links_every_docs_page():
    linked = linked_files(README)
    missing = [p.relative_to(ROOT).as_posix() for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, "docs pages not linked from README.md: " + ", ".join(missing)


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_page_starts_with_a_title(page: Path):
    first = page.read_text(encoding="utf-8").split("\n", 1)[0]
    assert first.startswith("# "), f"{page.name} must start with a '# Title' line, found {first!r}"


def test_the_checker_reports_broken_links(tmp_path):
    (tmp_path / "there.md").write_text("# There\n", encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](there.md) [ok with anchor](there.md#there) ![ok image](pic.png) [anchor](#page)\n"
        "[web](https://example.org/x.md) [mail](mailto:someone@example.org)\n"
        "[gone](missing.md) ![gone image](missing.png \"title\") [gone with anchor](nowhere.md#part)\n"
        "[ref]: missing-ref.md\n"
        "`[in code](missing-in-code.md)`\n\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n",
        encoding="utf-8")
    broken = [entry.split(" ", 1)[0] for entry in broken_links(page)]
    assert broken == ["missing.md", "missing.png", "nowhere.md#part", "missing-ref.md"]
