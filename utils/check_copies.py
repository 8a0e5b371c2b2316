"""Check that every ``# Copied from`` block still matches its source, as diffusers' ``make fix-copies`` does.

A copy is marked in the file that holds it::

    # Copied from train_scripts/train_dit_flow.py[ with old->new[, old2->new2]]
    ...the copied lines...
    # End copy

The lines between the marks, without their common indentation and with each ``old->new`` applied, must appear as
consecutive lines of the source file (again without indentation). The marks of the model files,
``# Copied from diffusability_hf.models.selfcond_dit.<name>``, name a function or class instead: the block is the
definition that follows the mark, compared with the named one's source (``tests/test_video_dit.py`` runs the same
check). A block that is meant to differ is marked ``# Adapted from`` and is not checked.

    python utils/check_copies.py          # exit code 1 and one line per stale copy
"""

import ast
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCHED = ("train_scripts", "benchmarks", "diffusability_hf", "experiments", "utils")
MARK = re.compile(r"^(?P<indent>\s*)# Copied from (?P<source>\S+?)(?: with (?P<renames>.+))?\s*$")
END = re.compile(r"^\s*# End copy\s*$")


def apply_renames(text, renames):
    for pair in filter(None, (r.strip() for r in (renames or "").split(","))):
        old, new = (s.strip() for s in pair.split("->"))
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return text


def normalized(lines):
    return [line.strip() for line in lines if line.strip()]


def contains(haystack, needle):
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def object_source(dotted):
    """Source lines of ``package.module.Name[.attr]`` (a function, class or method)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        path = os.path.join(ROOT, *parts[:cut]) + ".py"
        if os.path.isfile(path):
            source = open(path, encoding="utf-8").read()
            node = ast.parse(source)
            for name in parts[cut:]:
                node = next(n for n in ast.iter_child_nodes(node) if getattr(n, "name", None) == name)
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            return source.splitlines()[first - 1 : node.end_lineno]
    raise FileNotFoundError(dotted)


def definition_after(lines, start):
    """The lines of the ``def`` or ``class`` (with its decorators) that starts at ``lines[start]``; [] if none."""
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if first == start + 1:
                return lines[start : node.end_lineno]
    return []


def check_file(path):
    """One message per stale or malformed copy in ``path``."""
    lines = open(path, encoding="utf-8").read().splitlines()
    rel = os.path.relpath(path, ROOT)
    problems = []
    for i, line in enumerate(lines):
        mark = MARK.match(line)
        if not mark:
            if line.lstrip().startswith("# Copied from"):
                problems.append(f"{rel}:{i + 1}: a '# Copied from' mark this check cannot read: {line.strip()!r}")
            continue
        source, renames = mark.group("source"), mark.group("renames")
        where = f"{rel}:{i + 1}"
        if "/" not in source and not source.endswith(".py"):  # a dotted object (the model files)
            try:
                wanted = apply_renames("\n".join(object_source(source)), renames).splitlines()
            except (FileNotFoundError, StopIteration):
                problems.append(f"{where}: {source} not found")
                continue
            block = definition_after(lines, i + 1)
            if not block or normalized(block) != normalized(wanted):
                problems.append(f"{where}: differs from {source}")
            continue
        end = next((j for j in range(i + 1, len(lines)) if END.match(lines[j]) or MARK.match(lines[j])), None)
        if end is None or not END.match(lines[end]):
            problems.append(f"{where}: no '# End copy' after the block")
            continue
        target = os.path.join(ROOT, source)
        if not os.path.isfile(target):
            problems.append(f"{where}: {source} not found")
            continue
        block = textwrap.dedent("\n".join(lines[i + 1 : end]))
        theirs = normalized(apply_renames(open(target, encoding="utf-8").read(), renames).splitlines())
        ours = normalized(block.splitlines())
        if not contains(theirs, ours):
            first = next((k for k in range(1, len(ours) + 1) if not contains(theirs, ours[:k])), len(ours))
            problems.append(f"{where}: differs from {source} (first line not found as copied: {ours[first - 1]!r})")
    return problems


def check_all(root=ROOT):
    problems = []
    for top in SEARCHED:
        for folder, _, files in os.walk(os.path.join(root, top)):
            for name in sorted(files):
                if name.endswith(".py") and name != "check_copies.py":
                    problems += check_file(os.path.join(folder, name))
    return problems


def main():
    problems = check_all()
    for problem in problems:
        print(problem)
    print(f"{len(problems)} stale cop{'y' if len(problems) == 1 else 'ies'}" if problems else "every copy matches")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
