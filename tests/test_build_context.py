"""The Docker build context, computed from .dockerignore with Docker's own rules (moby/patternmatcher as the docker
CLI and BuildKit apply it), leaves out environments, run outputs, bench work folders and .git; the image installs
runtime dependencies only and runs as a non-root user. Docker itself is not needed."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUST_LEAVE_OUT = [".venv", "runs", "out", "bench/_work", ".git"]
MUST_KEEP = ["app.py", "requirements.txt", "pyproject.toml", "README.md", "ral_core/__init__.py",
             "app/__init__.py", "assets/default_model/config.json"]
TEST_TOOLS = ("pytest", "playwright", "pytest-", "trl")


# ---- Docker's .dockerignore rules --------------------------------------------------------------------------------
def read_dockerignore(text: str) -> list[tuple[bool, str]]:
    """(exclusion, cleaned pattern) per line, as the CLI reads them: '#' lines are comments, blanks are skipped, a
    leading '!' makes an exception, each pattern is path-cleaned and loses a leading '/'."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        pat = line.strip()
        if not pat:
            continue
        exclusion = pat.startswith("!")
        if exclusion:
            pat = pat[1:].strip()
        if not pat:
            continue
        pat = os.path.normpath(pat)
        if len(pat) > 1 and pat.startswith("/"):
            pat = pat[1:]
        if pat == ".":
            continue
        out.append((exclusion, pat))
    return out


def _matcher(pat: str):
    """A path-matching function for one cleaned pattern (patternmatcher's compile(), including its fast paths:
    `foo/**` is a prefix match, `**/foo` a suffix match)."""
    regex, kind, i = "^", "exact", 0
    while i < len(pat):
        ch = pat[i]
        if ch == "*":
            if i + 1 < len(pat) and pat[i + 1] == "*":
                i += 1
                if i + 1 < len(pat) and pat[i + 1] == "/":
                    i += 1
                if i + 1 >= len(pat):  # '**' at the end: everything below
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        regex += ".*"
                        kind = "regexp"
                else:
                    regex += "(.*/)?"
                    kind = "regexp"
                if i <= 2 and pat.startswith("**"):
                    kind = "suffix"
            else:
                regex += "[^/]*"
                kind = "regexp"
        elif ch == "?":
            regex += "[^/]"
            kind = "regexp"
        elif ch == "\\":
            i += 1
            regex += re.escape(pat[i]) if i < len(pat) else "\\\\"
        elif ch in "[]":
            regex += ch
            kind = "regexp"
        else:
            regex += re.escape(ch)
        i += 1
    if kind == "exact":
        return lambda p: p == pat
    if kind == "prefix":
        return lambda p: p.startswith(pat[:-2])
    if kind == "suffix":
        suffix = pat[2:]
        return lambda p: p.endswith(suffix) or (suffix.startswith("/") and p == suffix[1:])
    rx = re.compile(regex + "$")
    return lambda p: rx.match(p) is not None


def excluded(rules: list[tuple[bool, str]], path: str) -> bool:
    """patternmatcher.MatchesOrParentMatches: the last matching pattern wins; a pattern also matches when it
    matches one of the path's parent folders."""
    matched = False
    parents = path.split("/")[:-1]
    for exclusion, pat in rules:
        if exclusion != matched:  # only a pattern that could change the verdict is evaluated
            continue
        m = _matcher(pat)
        hit = m(path) or any(m("/".join(parents[:i + 1])) for i in range(len(parents)))
        if hit:
            matched = not exclusion
    return matched


def build_context(root: Path) -> set[str]:
    """Every file `docker build root` would send (the Dockerfile and .dockerignore always travel)."""
    rules = read_dockerignore((root / ".dockerignore").read_text()) if (root / ".dockerignore").exists() else []
    has_exceptions = any(ex for ex, _ in rules)
    sent = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if not has_exceptions:  # an excluded folder is not walked unless an exception could re-include a file
            dirnames[:] = [d for d in dirnames if not excluded(rules, f"{rel_dir}/{d}".lstrip("/"))]
        for f in filenames:
            rel = f"{rel_dir}/{f}".lstrip("/")
            if not excluded(rules, rel) or rel in ("Dockerfile", ".dockerignore"):
                sent.add(rel)
    return sent


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


# ---- the matcher follows Docker's rules -----------------------------------------------------------------------
@pytest.mark.parametrize("lines, path, want", [
    (["runs"], "runs/a/b.txt", True),              # a folder excludes what is in it
    (["runs"], "app/runs/x", False),               # anchored at the context root, unlike .gitignore
    (["/runs/"], "runs/x", True),                  # leading and trailing slashes are cleaned away
    (["**/__pycache__"], "__pycache__/a.pyc", True),
    (["**/__pycache__"], "a/b/__pycache__/c.pyc", True),
    (["*.md", "!README.md"], "README.md", False),  # an exception re-includes
    (["*.md", "!README.md"], "docs/x.md", False),  # '*' does not cross '/'
    (["*.md", "!README.md"], "x.md", True),
    (["docs/**"], "docs/a/b.png", True),
    (["bench/*/cache"], "bench/_work/cache/x", True),
    (["b?nch"], "bench/x", True),
    (["# runs", "out"], "runs/x", False),          # a comment line
])
def test_matcher_follows_docker(lines, path, want):
    assert excluded(read_dockerignore("\n".join(lines)), path) is want


# ---- this repository's context ----------------------------------------------------------------------------------
def _fake_tree(tmp_path: Path) -> Path:
    """The repository's .dockerignore over a tree that has every folder it must leave out (a fresh clone has none)."""
    (tmp_path / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    for rel in MUST_KEEP + ["Dockerfile", ".venv/bin/python", ".venv/lib/site.py", "runs/ral/checkpoints/latest",
                            "out/overlay.png", "bench/_work/teacher/config.json", ".git/HEAD", ".git/objects/ab/cd",
                            "ral_core/__pycache__/x.pyc", "bench/home_regime.py"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    return tmp_path


def test_context_leaves_out_environments_outputs_and_git(tmp_path):
    assert (ROOT / ".dockerignore").is_file(), "the repository needs a .dockerignore"
    sent = build_context(_fake_tree(tmp_path))
    leaked = sorted(p for p in sent if any(_under(p, f) for f in MUST_LEAVE_OUT))
    assert not leaked, f"the build context would carry {leaked}"
    assert not [p for p in sent if "__pycache__" in p]
    assert set(MUST_KEEP) <= sent and "bench/home_regime.py" in sent


def test_the_real_tree(tmp_path):
    """The same on this checkout as it is (with whatever .venv, runs/ or out/ it holds now)."""
    sent = build_context(ROOT)
    leaked = sorted(p for p in sent if any(_under(p, f) for f in MUST_LEAVE_OUT))
    assert not leaked, f"the build context would carry {leaked[:5]} ({len(leaked)} files)"
    assert set(MUST_KEEP) <= sent


def test_without_dockerignore_the_test_would_fail(tmp_path):
    """The check itself bites: with no .dockerignore the folders travel."""
    root = _fake_tree(tmp_path)
    (root / ".dockerignore").unlink()
    sent = build_context(root)
    assert {f for f in MUST_LEAVE_OUT if any(_under(p, f) for p in sent)} == set(MUST_LEAVE_OUT)


# ---- what the image installs and who runs it -------------------------------------------------------------------
def _requirements() -> list[str]:
    return [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.split("#")[0].strip()]


def test_runtime_requirements_have_no_test_tools():
    names = [re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in _requirements()]
    assert not [n for n in names if n.startswith(TEST_TOOLS)], names
    assert "torch==2.13.0" in _requirements()  # exact: a range could pull another (CUDA) build on a CPU machine
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("pytest") for d in extras["dev"]) and any(d.startswith("playwright") for d in extras["dev"])
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: install-dev\b", make, re.M) and re.search(r"^demo: install$", make, re.M)


def test_dockerfile_runs_as_non_root_with_runtime_dependencies():
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip() and
             not ln.lstrip().startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root USER"
    text = "\n".join(lines)
    assert "-r requirements.txt" in text and ".[dev" not in text and "pytest" not in text and "playwright" not in text
