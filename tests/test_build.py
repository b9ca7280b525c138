"""BUILD stays true to the tree: every listed source exists, every module and test is listed."""

import ast
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_text():
    with open(os.path.join(ROOT, "BUILD")) as f:
        return f.read()


def _listed_sources():
    return set(re.findall(r'"([\w/]+\.py)"', _build_text()))


def test_every_listed_source_exists():
    missing = sorted(p for p in _listed_sources() if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"BUILD lists files that do not exist: {missing}"


def test_every_module_is_listed():
    modules = {os.path.relpath(p, ROOT) for pkg in ("dc_core", "dc_tf", "eval", "pipelines")
               for p in glob.glob(os.path.join(ROOT, pkg, "**", "*.py"), recursive=True)}
    unlisted = sorted(modules - _listed_sources())
    assert not unlisted, f"modules missing from BUILD: {unlisted}"


def test_every_test_is_a_py_test_target():
    text = _build_text()
    # Tests are declared by a glob over tests/test_*.py inside a py_test comprehension.
    comprehension = re.search(
        r'\[py_test\((.*?)\) for test in glob\(\["tests/\*\*/test_\*\.py"\]\)\]', text, re.S)
    assert comprehension and "srcs = [test]" in comprehension.group(1)
    tests = glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)
    assert tests, "no tests found"
    support = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "*.py"))
               if not os.path.basename(p).startswith("test_")}
    assert support <= _listed_sources(), f"test helpers missing from BUILD: {support}"


def test_every_tool_is_listed():
    tools = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))}
    assert tools, "no tools found"
    unlisted = sorted(tools - _listed_sources())
    assert not unlisted, f"tools missing from BUILD: {unlisted}"


# ------------------------------------------------------------- MODULE.bazel and the pinned lock

def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_tool():
    spec = importlib.util.spec_from_file_location(
        "lock_requirements", os.path.join(ROOT, "tools", "lock_requirements.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pinned():
    """{normalised name: version} of requirements_lock.txt; every non-comment line is name==v."""
    pinned = {}
    with open(os.path.join(ROOT, "requirements_lock.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                name, sep, version = line.partition("==")
                assert sep and version, f"requirements_lock.txt: not pinned: {line!r}"
                pinned[_normalize(name)] = version
    return pinned


def test_module_bazel_parses_the_lock_into_the_pip_hub():
    with open(os.path.join(ROOT, "MODULE.bazel")) as f:
        text = f.read()
    assert re.search(r'bazel_dep\(name = "rules_python", version = "\d+\.\d+\.\d+"\)', text)
    assert re.search(r'python\.toolchain\([^)]*python_version = "3\.11"', text, re.S)
    parse = re.search(r"pip\.parse\((.*?)\)", text, re.S)
    assert parse, "MODULE.bazel has no pip.parse"
    assert 'hub_name = "pip"' in parse.group(1)
    assert 'requirements_lock = "//:requirements_lock.txt"' in parse.group(1)
    assert 'use_repo(pip, "pip")' in text
    assert '"@pip//:requirements.bzl"' in _build_text()  # the hub BUILD loads


def test_every_build_requirement_is_pinned():
    wanted = {_normalize(n) for n in re.findall(r'requirement\("([^"]+)"\)', _build_text())}
    assert wanted
    unpinned = sorted(wanted - set(_pinned()))
    assert not unpinned, f"requirement()s of BUILD not in requirements_lock.txt: {unpinned}"


def test_every_setup_requirement_is_pinned():
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    setup = next(n for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    keywords = {k.arg: ast.literal_eval(k.value) for k in setup.keywords
                if k.arg in ("install_requires", "extras_require")}
    names = {_normalize(re.match(r"[A-Za-z0-9_.-]+", r).group(0))
             for r in keywords["install_requires"] + keywords["extras_require"]["dev"]}
    assert "tensorflow" in names and "pytest" in names
    unpinned = sorted(names - set(_pinned()))
    assert not unpinned, f"setup.py requirements not in requirements_lock.txt: {unpinned}"


def test_every_pin_satisfies_setup_py():
    from packaging.requirements import Requirement
    pinned = _pinned()
    tool = _lock_tool()
    wrong = [f"{r}: pinned {pinned[_normalize(Requirement(r).name)]}"
             for r in tool.setup_requirements()
             if pinned[_normalize(Requirement(r).name)] not in Requirement(r).specifier]
    assert not wrong, f"requirements_lock.txt breaks setup.py's requirements: {wrong}"


@pytest.mark.skipif("TEST_SRCDIR" in os.environ,
                    reason="under Bazel the runfiles hold only the packages the deps name")
def test_the_generator_pins_what_is_installed_with_its_dependencies():
    # On the installed absl-py (no dependencies of its own) and packaging's users: the pins are
    # the installed versions, and dependencies are followed.
    import importlib.metadata
    text = _lock_tool().lock_text(["absl-py", "pytest"])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert f"absl-py=={importlib.metadata.version('absl-py')}" in lines
    assert f"pytest=={importlib.metadata.version('pytest')}" in lines
    assert f"pluggy=={importlib.metadata.version('pluggy')}" in lines  # pytest's dependency
    assert lines == sorted(lines)
