"""BUILD stays true to the tree: every listed source exists, every module and test is listed."""

import glob
import os
import re

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
