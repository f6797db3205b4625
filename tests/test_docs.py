"""The README and docs/ hold together: every relative link and image points at a file in the
repository (and, into a Markdown file, at one of its headings), every doc is reachable from
the README, and the README stays a front door that `.ci/run` can trust."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target), text holding at most one level of brackets; an
# optional "title" after the target; <target> for targets with spaces.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
        else:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: heading slugs (repeats get -1, -2, ...) and <a id>."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in outside_fences(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            seen[base] = seen.get(base, 0) + 1
            found.add(base if seen[base] == 1 else f"{base}-{seen[base] - 1}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in a Markdown file, outside code."""
    found = []
    for number, line in outside_fences(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        for pattern in (INLINE, REFERENCE, HTML):
            found += [(number, target.strip("<>")) for target in pattern.findall(line)]
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """'file:line: target (why)' for each relative link that does not resolve."""
    broken = []
    for number, target in links(path):
        if SCHEME.match(target):
            continue  # http(s)://, mailto: and other external links are not checked
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not dest.is_relative_to(root.resolve()):
            broken.append(f"{where} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{where} (no heading with that anchor in {dest.name})")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve(doc):
    broken = broken_links(doc, ROOT)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_doc_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in links(README)}
    orphans = [str(d.relative_to(ROOT)) for d in DOCS[1:] if d.resolve() not in linked]
    assert not orphans, f"docs the README's table does not link: {orphans}"


def test_readme_is_a_front_door_ci_can_trust():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md over 250 lines: move the detail to docs/"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line for line in ci if line.startswith(("python3 ", ".venv/"))]
    assert commands, ".ci/run runs no setup or test command"
    for command in commands:
        assert command in text.splitlines(), f"the README no longer shows .ci/run's command: {command}"


def test_the_checker_finds_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A `code` heading: yes\n\n## Twice\n\n## Twice\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/there.md) [ok](docs/there.md#a-code-heading-yes) [ok](docs/there.md#twice-1)\n"
        "![gone](img/missing.png) [gone](docs/missing.md) [bad anchor](docs/there.md#nowhere)\n"
        "[web](https://example.com/x) [mail](mailto:a@b.c) [self](#top) `[code](nowhere.md)`\n"
        "[out](../../etc/passwd)\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "# Top\n"
    )
    found = broken_links(doc, tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [
        "img/missing.png (no such file)",
        "docs/missing.md (no such file)",
        "docs/there.md#nowhere (no heading with that anchor in there.md)",
        "../../etc/passwd (outside the repository)",
    ]
