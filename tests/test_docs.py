"""The README and docs/: every relative link points to a file of the repository, and every #anchor to a heading of
its page (GitHub's slugs), so that moving a section cannot leave a dead link behind."""

import glob
import os
import re

from testing_utils import ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped but hyphens and underscores, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as fh:
        text = re.sub(r"```.*?```", "", fh.read(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def dead_links(page):
    with open(page, encoding="utf-8") as fh:
        text = re.sub(r"```.*?```", "", fh.read(), flags=re.S)
    dead = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(file):
            dead.append(target)
        elif anchor and file.endswith(".md") and anchor not in anchors(file):
            dead.append(target)
    return dead


def test_every_relative_link_and_anchor_resolves():
    dead = {os.path.relpath(p, ROOT): dead_links(p) for p in PAGES}
    assert {k: v for k, v in dead.items() if v} == {}


def test_the_link_check_finds_a_dead_link_and_a_dead_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top part\n\n[ok](a.md#top-part) [gone](b.md) [bad](#nowhere)\n")
    assert dead_links(str(tmp_path / "a.md")) == ["b.md", "#nowhere"]


def test_the_readme_stays_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        assert len(fh.read().splitlines()) <= 320  # what it is, the two commands, results at a glance, a map
