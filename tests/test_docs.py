"""The README is a newcomer's guide: at most 250 lines, the two set-up commands first, and every link
and path in it and in the pages it sends readers to leads somewhere. docs/configuration.md lists every
config key; the results index lists every results folder."""

import glob
import re
from pathlib import Path

import pytest

from fedcmd.config import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_INDEX = ROOT / "experiments" / "results" / "README.md"
PAGES = sorted({README, RESULTS_INDEX, *ROOT.glob("docs/*.md"), *ROOT.glob("experiments/**/README.md")})
LINK = re.compile(r"!?\[((?:[^\]\\]|\\.)*)\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./-])(?:docs|experiments|tests|fedcmd|strategies|clients)/[\w./-]*")


def prose(text: str) -> list[str]:
    """The lines of a markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: link markup reduced to its text, lower case, punctuation
    dropped, each space a hyphen (a repeated heading also gets -1, -2, ...)."""
    found: set[str] = set()
    for line in prose(page.read_text()):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if not match:
            continue
        text = LINK.sub(lambda m: m[1], match[1]).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = sum(1 for a in found if a == slug or re.fullmatch(re.escape(slug) + r"-\d+", a))
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [m[2] for line in prose(page.read_text()) for m in LINK.finditer(line)]


def test_readme_is_at_most_250_lines_with_the_two_set_up_commands_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    first_block = code_blocks(text)[0]
    commands = [line.split("#")[0].strip() for line in first_block if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    before = text[: text.index("```")]
    assert "\n## " not in before, "the set-up commands come before the first section"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_a_page_names_exists(page):
    missing = sorted({p for p in PATH.findall(page.read_text()) if not glob.glob(str(ROOT / p.rstrip(".")) + "*")})
    assert not missing, missing


def test_the_configuration_page_lists_every_config_key():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert [key for key in SCHEMA if f"`{key}`" not in text] == []


def test_the_results_index_links_every_results_folder():
    linked = {Path(target.partition("#")[0]).parts[0] for target in links(RESULTS_INDEX) if "://" not in target}
    folders = {p.name for p in RESULTS_INDEX.parent.iterdir() if p.is_dir()}
    assert folders - linked == set()
