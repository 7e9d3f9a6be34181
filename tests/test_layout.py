"""The shape of the repository that readers rely on: modules import each other without a circle (so each file can be
read, and imported, on its own), and the front page and the docs point only at things that exist."""

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def imports_of(name):
    """Top-level modules of this repository that `name`.py imports anywhere: at the top, inside functions, lazily."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value.split(".")[0])
    return found & set(MODULES) - {name}


def test_no_import_circle_among_the_top_level_modules():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}  # absent: unvisited; 1: on the current path; 2: done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import circle: " + " -> ".join(f"{c}.py" for c in cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])


def markdown_files():
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "tests", "README.md"),
            *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_every_relative_link_in_the_readme_and_the_docs_resolves():
    broken = []
    for md in markdown_files():
        if not os.path.exists(md):
            broken.append(f"{os.path.relpath(md, ROOT)} is missing")
            continue
        with open(md) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)  # code blocks hold commands, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            path = os.path.normpath(os.path.join(os.path.dirname(md), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(md, ROOT)} -> {target}")
    assert not broken, "links to nothing: " + "; ".join(broken)


def test_the_readme_is_a_front_page_that_names_every_top_level_file():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    lines = readme.count("\n")
    assert lines <= 260, f"README.md has {lines} lines: a front page, with the rest in docs/"
    missing = [m + ".py" for m in MODULES if m + ".py" not in readme]
    assert not missing, f"README.md does not name {', '.join(missing)}"
