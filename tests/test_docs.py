"""The documentation holds together: every link resolves, every make variable is documented, the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from env.rig import runtime
from tests.helpers.paths import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAKE_VARIABLES_DOC = DOCS / "make-variables.md"
README_MAX_LINES = 200

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def outside_code(text: str, spans: bool = False) -> list[str]:
    """The lines outside fenced and indented code blocks; inline code spans removed unless `spans`."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith(("    ", "\t")):
            lines.append(line if spans else re.sub(r"`[^`]*`", "", line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = text.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, a repeated one numbered as GitHub does (-1, -2, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in outside_code(path.read_text(), spans=True):  # GitHub anchors `make eval` as make-eval
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = "\n".join(outside_code(path.read_text()))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of a Markdown file whose file is missing, or whose #anchor no heading there has."""
    problems = []
    for target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.relative_to(root)}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.relative_to(root)}: {target}: no heading with that anchor")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_a_missing_file_and_a_missing_anchor_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Its `make eval` part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#its-make-eval-part) [self](#page) [web](https://example.com/x#y)\n"
        "[gone](missing.md) [bad anchor](other.md#nothing)\n\n    [in code](nowhere.md)\n`[span](nowhere.md)`\n"
    )
    assert broken_links(page, tmp_path) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#nothing: no heading with that anchor",
    ]


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Starting from an export (train.init_from)", "starting-from-an-export-traininit_from"),
        ("nccl-test: do the GPUs talk?", "nccl-test-do-the-gpus-talk"),
        ("One job per RUN_DIR", "one-job-per-run_dir"),
        ("metrics.jsonl", "metricsjsonl"),
        ("`make eval`", "make-eval"),
    ],
)
def test_anchors_follow_githubs_slugs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_the_index_links_every_docs_page() -> None:
    index = DOCS / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index) if not EXTERNAL.match(t)}
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {index.resolve()}
    assert sorted(p.name for p in pages - linked) == []


def variable_rows() -> list[tuple[set[str], set[str]]]:
    """(variables, targets) of each row of make-variables.md's tables: the first two columns."""
    rows = []
    for line in MAKE_VARIABLES_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-: "):
            continue
        names = set(re.findall(r"`([A-Z][A-Z0-9_]*\*?)`", cells[0]))
        if names:
            rows.append((names, {t.strip().strip("`") for t in cells[1].split(",")}))
    return rows


def test_every_make_variable_is_documented() -> None:
    make_vars = runtime.MAKE_VARS
    documented = set().union(*(names for names, _ in variable_rows()))
    assert sorted(set(make_vars) - documented) == []


def test_every_variable_is_documented_for_every_target_that_takes_it() -> None:
    rows = variable_rows()
    missing = [
        f"{name} for {target}"
        for target in (*runtime.TARGETS, *runtime.OWN_TARGETS)
        for name in runtime.target_variables(target)
        if not any(name in names and (target in targets or "all" in targets) for names, targets in rows)
    ]
    assert missing == []


def test_the_make_variables_doc_names_nothing_that_is_gone() -> None:
    known_targets = {*runtime.TARGETS, *runtime.OWN_TARGETS, "all"}
    environment = {f"{prefix}*" for prefix in runtime.ENVIRONMENT_PREFIXES}
    for names, targets in variable_rows():
        assert names <= set(runtime.MAKE_VARS) | environment, names
        assert targets <= known_targets, targets


def test_the_readme_is_short_and_starts_with_make_train_and_make_test() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\s+make train\b", quick_start, re.MULTILINE)
    assert re.search(r"^\s+make test\b", quick_start, re.MULTILINE)
