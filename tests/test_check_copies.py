"""utils/check_copies.py: every ``# Copied from`` block of the repository matches its source, and the check finds a
stale copy, a block without its end and a mark it cannot read."""

import importlib.util
import os

from testing_utils import ROOT

spec = importlib.util.spec_from_file_location("check_copies", os.path.join(ROOT, "utils", "check_copies.py"))
check_copies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_copies)

SOURCE = """
def parse_args(parser):
    parser.add_argument("--seed", type=int, default=0, help="Seed.")
    parser.add_argument("--steps", type=int, default=10, help="Steps.")
    parser.add_argument("--lr", type=float, default=1e-4, help="Learning rate.")


class Model:
    @staticmethod
    def init(x):
        return x + 1
"""

COPY = """
def parse_args(parser):
    parser.add_argument("--other", type=int, default=0)
    # Copied from train_scripts/source.py
    parser.add_argument("--steps", type=int, default=10, help="Steps.")
    parser.add_argument("--lr", type=float, default=1e-4, help="Learning rate.")
    # End copy


# Copied from train_scripts.source.Model.init with x->y
@staticmethod
def init(y):
    return y + 1
"""


def test_every_copy_in_the_repository_matches():
    assert check_copies.check_all() == []


def tree(tmp_path, copy):
    (tmp_path / "train_scripts").mkdir(exist_ok=True)
    (tmp_path / "train_scripts" / "source.py").write_text(SOURCE)
    (tmp_path / "train_scripts" / "copy.py").write_text(copy)
    return str(tmp_path / "train_scripts" / "copy.py")


def check(tmp_path, monkeypatch, copy):
    monkeypatch.setattr(check_copies, "ROOT", str(tmp_path))
    return check_copies.check_file(tree(tmp_path, copy))


def test_a_faithful_copy_passes(tmp_path, monkeypatch):
    assert check(tmp_path, monkeypatch, COPY) == []


def test_a_changed_copy_is_reported_with_the_line_that_drifted(tmp_path, monkeypatch):
    stale = COPY.replace('default=1e-4, help="Learning rate."', 'default=3e-4, help="Learning rate."')
    [problem] = check(tmp_path, monkeypatch, stale)
    assert problem.startswith("train_scripts/copy.py:4: differs from train_scripts/source.py") and "3e-4" in problem


def test_a_changed_object_copy_is_reported(tmp_path, monkeypatch):
    [problem] = check(tmp_path, monkeypatch, COPY.replace("return y + 1", "return y + 2"))
    assert problem == "train_scripts/copy.py:10: differs from train_scripts.source.Model.init"


def test_a_block_without_its_end_and_an_unreadable_mark_are_reported(tmp_path, monkeypatch):
    no_end = COPY.replace("    # End copy\n", "")
    assert check(tmp_path, monkeypatch, no_end) == ["train_scripts/copy.py:4: no '# End copy' after the block"]
    free_text = COPY.replace("# Copied from train_scripts/source.py", "# Copied from source.py (the step flags)")
    [problem] = check(tmp_path, monkeypatch, free_text)
    assert "a '# Copied from' mark this check cannot read" in problem
