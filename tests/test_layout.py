"""The repository's layout: packages import each other in one direction, nothing imports the CLI, the installed
packages are the listed ones under the one import path decmem.<folder>, and the README's tree names every top-level
folder."""
import ast
import configparser
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["model", "data_pipeline", "training", "slurm", "evaluation", "bench", "cli", "devtools"]


INSTALLED = [p for p in PACKAGES if p != "devtools"]      # installed as decmem.<folder>; devtools is not installed


def _modules(folder: str) -> list[tuple[str, str]]:
    """(file, imported module name) for every absolute import in the .py files under folder."""
    out = []
    for d, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for n in ast.walk(tree):
                if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                    out.append((path, n.module))
                elif isinstance(n, ast.Import):
                    out += [(path, a.name) for a in n.names]
    return out


def _package(module: str) -> str:
    """The repository folder a module name belongs to: decmem.training.trainer -> training."""
    parts = module.split(".")
    return parts[1] if parts[0] == "decmem" and len(parts) > 1 else parts[0]


def _imports(pkg: str) -> set[str]:
    """Top-level packages of this repository imported anywhere in pkg (module level or inside functions)."""
    return {_package(m) for _, m in _modules(pkg)} & set(PACKAGES) - {pkg}


def test_project_packages_are_imported_only_as_decmem_dot_folder():
    # a bare `import training` / `from model.x import` would work from the repo root (cwd on sys.path) and fail
    # once installed; python -m strings are checked by the subprocess tests that run them
    bare = [(os.path.relpath(f, ROOT), m) for folder in [*PACKAGES, "tests"] for f, m in _modules(folder)
            if m.split(".")[0] in INSTALLED]
    assert not bare, bare


def test_package_imports_form_a_dag_and_nothing_imports_the_cli():
    edges = {p: _imports(p) for p in PACKAGES}
    assert not any("cli" in e for p, e in edges.items()), edges
    assert "slurm" not in edges["training"] and "training" in edges["slurm"]
    assert edges["model"] == set() and edges["devtools"] == set()
    # depth-first search for a cycle
    state = {}

    def visit(p, path):
        state[p] = "open"
        for q in edges[p]:
            assert state.get(q) != "open", f"import cycle: {' -> '.join([*path, p, q])}"
            if q not in state:
                visit(q, [*path, p])
        state[p] = "done"

    for p in PACKAGES:
        if p not in state:
            visit(p, [])


def test_training_holds_no_cli_evaluation_or_benchmark():
    names = {f for f in os.listdir(os.path.join(ROOT, "training")) if f.endswith(".py")}
    assert not {n for n in names if re.match(r"(cli|demo|bench_.*|eval.*|generate|plots|overlap|.*_check)\.py$", n)}


def test_installed_packages_and_devtools_runs_with_the_standard_library_alone():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    listed = set(cfg["options"]["packages"].split())
    mapped = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert mapped == {f"decmem.{p}": p for p in INSTALLED}
    # every folder with an __init__.py under an installed folder is listed (a new subpackage would not ship)
    on_disk = {"decmem." + os.path.relpath(d, ROOT).replace(os.sep, ".") for p in INSTALLED
               for d, _, files in os.walk(os.path.join(ROOT, p)) if "__init__.py" in files}
    assert listed == on_disk, listed ^ on_disk
    from decmem.slurm.submit import PACKAGES as SNAPSHOT  # the code snapshot lays out the same folders

    assert set(SNAPSHOT) == set(INSTALLED)
    # .ci/run starts the local SLURM with the system python before anything is installed: no third-party import
    r = subprocess.run([sys.executable, "-S", "-c", "import devtools.local_cluster"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_tree_names_every_top_level_folder():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    tree = readme[readme.index("## Where things are"):]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    folders = {p.split("/")[0] for p in tracked if "/" in p and not p.startswith(".")}
    if not folders:                                  # not a git checkout: the folders on disk
        folders = {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and not d.startswith(".")
                   and d not in ("runs", "build") and not d.endswith(".egg-info")}
    missing = [d for d in sorted(folders) if not re.search(rf"^{re.escape(d)}/", tree, re.M)]
    assert not missing, f"README's tree lacks {missing}"
