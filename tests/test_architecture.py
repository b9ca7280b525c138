"""The shape of the code base, read from its sources: who may import whom, the run folder's one
owner, no import cycles, and functions and programs short enough to read."""

import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dc_core", "dc_tf", "eval", "pipelines")
# What pipelines/ may use of dc_tf: training and the run folder.
DC_TF_PUBLIC = {"dc_tf.train", "dc_tf.train_flags", "dc_tf.config", "dc_tf.run_dir"}


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _sources(*packages) -> dict:
    """module name -> path, for every .py file of the packages."""
    return {_module_name(p): p for package in packages
            for p in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)}


MODULES = _sources(*PACKAGES)


def _imports(path: str) -> set:
    """The project modules `path` imports, anywhere in the file (a function's import too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from package import module` imports the module; `from module import name`, the
            # module.
            submodules = [f"{node.module}.{a.name}" for a in node.names
                          if f"{node.module}.{a.name}" in MODULES]
            names = submodules if len(submodules) == len(node.names) else [node.module,
                                                                           *submodules]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _importers_of(prefix: str, among: str) -> dict:
    return {m: sorted(i for i in imports if i == prefix or i.startswith(prefix + "."))
            for m, imports in GRAPH.items() if m.split(".")[0] == among}


def test_eval_imports_nothing_of_dc_tf():
    offending = {m: i for m, i in _importers_of("dc_tf", "eval").items() if i}
    assert not offending, f"eval/ must stand on the export alone, but imports: {offending}"


def test_dc_core_imports_neither_training_nor_evaluation():
    offending = {m: sorted(i for i in imports if i.split(".")[0] != "dc_core")
                 for m, imports in GRAPH.items() if m.split(".")[0] == "dc_core"}
    assert not any(offending.values()), offending


def test_pipelines_use_only_the_training_entry_points_and_the_run_folder():
    offending = {m: [i for i in imports if i not in DC_TF_PUBLIC]
                 for m, imports in _importers_of("dc_tf", "pipelines").items()}
    assert not any(offending.values()), offending


# The programs built on a run and its export, which training never needs.
PROGRAMS = {"dc_tf.assign", "dc_tf.clusters", "dc_tf.visualize", "dc_tf.visualization.commands"}


def test_training_does_not_reach_the_programs_built_on_it():
    reached, todo = set(), ["dc_tf.train"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += GRAPH[module]
    assert "dc_tf.methods" in reached and "dc_tf.run_dir" in reached
    assert not reached & PROGRAMS, sorted(reached & PROGRAMS)


def test_no_import_cycle():
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_import_graph_is_read():
    # The checks above would pass on an empty graph: make sure the walk finds real arrows.
    assert "dc_tf.run_dir" in GRAPH["dc_tf.train"]
    assert "dc_core.clustering" in GRAPH["eval.linear_probe"]


# The run folder's file names, as they appear in a path or a message. Only dc_tf/run_dir.py names
# them; the model's `assignments` variable is no file.
_LAYOUT_NAMES = re.compile(r"metrics\.jsonl|examples\.tsv|final_clustering\.(json|npz)"
                           r"|assignments/|final\.npy|(?<!name=)[\"']assignments[\"']")


def test_only_the_run_folder_module_names_its_files():
    files = [*MODULES.values(), *glob.glob(os.path.join(ROOT, "bench", "*.py")),
             *glob.glob(os.path.join(ROOT, "tools", "*.py"))]
    found = [f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}"
             for path in files if not path.endswith(os.path.join("dc_tf", "run_dir.py"))
             for number, line in enumerate(open(path), 1) if _LAYOUT_NAMES.search(line)]
    assert not found, "run folder paths built outside dc_tf/run_dir.py:\n" + "\n".join(found)


def test_nothing_points_outside_the_repository():
    found = []
    for path in _project_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if re.search(r"\.\./shared|DESIGN\.md|PROTOCOLS\.md|STYLE\.md", line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


# A path of the repository named in code or docs: "docs/protocols.md", "bench/RESULTS.md", ...
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:docs|bench|flags|dc_tf|dc_core|eval|pipelines|tools)/"
                        r"[\w/.-]*\.(?:md|py|cfg|png|json|txt))")
# A relative link of a markdown page: [text](target) or [text](target#anchor).
_MD_LINK = re.compile(r"\]\((?!https?://|#)([^)#\s]+)")


def test_every_file_named_in_code_and_docs_is_in_the_repository():
    missing = []
    for path in _project_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                named = [(os.path.join(ROOT, p.rstrip(".")), p) for p in _REPO_PATH.findall(line)]
                if path.endswith(".md"):
                    named += [(os.path.join(os.path.dirname(path), p), p)
                              for p in _MD_LINK.findall(line)]
                missing += [f"{os.path.relpath(path, ROOT)}:{number}: {shown}"
                            for target, shown in named if not os.path.exists(target)]
    assert not missing, "\n".join(missing)


def _project_files() -> list:
    """Every text file of the project outside tests/ and build outputs."""
    skip = {".git", "tests", "build", "__pycache__"}
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        out += [os.path.join(folder, f) for f in files
                if f.endswith((".py", ".md", ".cfg", ".txt", ".bazel", ".ini"))
                or f in ("BUILD", "Makefile", "run")]
    return out


def test_train_reads_top_to_bottom():
    with open(MODULES["dc_tf.train"]) as f:
        lines = f.read().splitlines()
    assert len(lines) < 200, f"dc_tf/train.py has {len(lines)} lines"


@pytest.mark.parametrize("package", ["dc_core", "dc_tf"])
def test_no_function_over_60_lines(package):
    long = []
    for name, path in _sources(package).items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long
