"""README.md points at committed files: its links, its anchors and the result paths it cites exist,
so that renaming a results folder or a heading cannot leave the README pointing at nothing."""
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
