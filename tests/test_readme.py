"""README.md points at committed files: its links, its anchors and the result paths it cites exist,
so that renaming a results folder or a heading cannot leave the README pointing at nothing; and
its result tables are copies of committed ones, so that a grid made again cannot leave a stale copy."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def github_anchor(heading):
    """'### Which idea is better: `compare.py`' -> 'which-idea-is-better-comparepy', as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor_of_a_known_heading():
    assert github_anchor("Which idea is better: `compare.py`") == "which-idea-is-better-comparepy"
    assert github_anchor("DCA — DeepCrossAttention (`dca.py`)") == "dca--deepcrossattention-dcapy"


def test_links_and_images_point_at_files_that_exist():
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", README) if not t.startswith(("http://", "https://", "#"))]
    assert targets, "no local link found: has the README's link syntax changed?"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_anchors_name_headings():
    headings = {github_anchor(h) for h in re.findall(r"^#+ (.*)$", README, re.M)}
    anchors = [t[1:] for t in re.findall(r"\]\((#[^)\s]+)\)", README)]
    assert anchors, "no anchor link found"
    assert not [a for a in anchors if a not in headings], f"anchors without a heading: {set(anchors) - headings}"


def test_the_result_and_test_paths_it_cites_exist():
    """`results/...` and `tests/...` in backticks: a file or folder, or a glob that matches one
    (placeholders such as <name> or {train,val} are patterns for the reader, not paths)."""
    cited = set(re.findall(r"`((?:results|tests)/[^`\s]*)`", README))
    assert len(cited) > 10
    paths = [p.rstrip("/") for p in cited if not re.search(r"[<>{}]", p)]
    missing = [p for p in paths if not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"README cites paths that do not exist: {sorted(missing)}"


def markdown_tables(text):
    """[[row, ...], ...]: each run of lines that start with '|', stripped."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line.strip())
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def test_result_tables_are_copies_of_committed_tables():
    """A README table whose header is a results/ file's (compare.py's, the GPU script's, bench.py's) must be
    lines of one such file (some rows of it may be left out): typed by hand, or left behind when the grid
    was made again (other numbers), it would not be."""
    files = {p: set(line.strip() for line in p.read_text().splitlines())
             for p in ROOT.glob("results/**/*") if p.suffix in (".md", ".txt") and p.is_file()}
    copied = 0
    for rows in markdown_tables(README):
        sources = [p for p, lines in files.items() if rows[0] in lines]
        if not sources:
            continue  # the README's own tables (the files, the papers)
        copied += 1
        best = min(sources, key=lambda p: sum(r not in files[p] for r in rows))
        assert all(r in files[best] for r in rows), (
            f"a README table is no copy of {best.relative_to(ROOT)}: rows not in it: "
            f"{[r[:100] for r in rows if r not in files[best]]}")
    assert copied >= 10, f"only {copied} README tables found in results/: has the tables' format changed?"
