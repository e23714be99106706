"""The repository's layout: packages import each other in one direction, nothing imports the CLI, the installed
packages are the listed ones, and the README's tree names every top-level folder."""
import ast
import configparser
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["model", "data_pipeline", "training", "slurm", "evaluation", "bench", "cli", "devtools"]


def _imports(pkg: str) -> set[str]:
    """Top-level packages of this repository imported anywhere in pkg (module level or inside functions)."""
    out = set()
    for d, _, files in os.walk(os.path.join(ROOT, pkg)):
        for f in files:
            if not f.endswith(".py"):
                continue
            with open(os.path.join(d, f)) as fh:
                tree = ast.parse(fh.read())
            for n in ast.walk(tree):
                if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                    out.add(n.module.split(".")[0])
                elif isinstance(n, ast.Import):
                    out.update(a.name.split(".")[0] for a in n.names)
    return (out & set(PACKAGES)) - {pkg}


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
    include = set(cfg["options.packages.find"]["include"].split())
    assert {p for p in PACKAGES if p != "devtools"} <= include and not any(i.startswith("devtools") for i in include)
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
