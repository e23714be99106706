"""Build the wheels the GPU check needs on a GPU machine that has no network (``make gpu-wheels``).

The GPU machine (docs: the device README; ENVIRONMENT.md "The GPU machine") has Python 3.12, torch 2.11 + CUDA 13,
Triton and many common packages, but not DeepSpeed, WebDataset, PyAV or submitit, and it cannot reach a package
registry. This script, run on a machine with the project's .venv and a registry, writes into one folder:

- DeepSpeed built here with no ops (``DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation``): a py3-none-any
  wheel; the trainer needs no compiled DeepSpeed op (torch AdamW, no offload);
- the other packages the project imports that the GPU machine lacks, downloaded for the target Python and
  manylinux x86-64 (``pip download --no-deps --only-binary=:all:``); two of them are binary (PyAV, pydantic-core);
- ``requirements.txt``: the top-level packages pinned, which ``devtools/gpu_check.py`` installs offline with
  ``pip install --no-index --find-links DIR -r DIR/requirements.txt`` (pip then resolves their dependencies from
  the folder and what the machine already has, and names anything missing);
- ``requirements-nodeps.txt``: every carried package, for its fallback ``--no-deps`` install when pip cannot
  resolve the first against the machine's own packages.

Versions are the ones installed in the environment that runs this script (the .venv the tests ran with). The total
size is checked against a limit (60 MiB by default: the device machine takes 64 MiB of working tree per call).

    python3 -m devtools.gpu_wheels --out wheels            # from the repository root, with the .venv's python
"""
from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import zipfile

# The top-level packages of the project (setup.cfg install_requires) the GPU machine lacks; pinned in requirements.txt.
ROOTS = ("deepspeed", "webdataset", "braceexpand", "submitit", "av")
# Their dependencies the GPU machine lacks or may hold in too old a version (pydantic needs a recent
# typing-extensions: pip keeps the machine's own when it satisfies the requirement and takes this one otherwise).
DEPENDENCIES = ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
BUILT = ("deepspeed",)               # built here from its source distribution, with no ops

# What the GPU machine's image holds (the device KINDS.md, "Python packages already there", read 2026-11-17).
# Used only to check that every requirement of a carried wheel is either carried or already there.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MiB = float(1 << 20)


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned(names) -> list[str]:
    """name==version for each, the version installed in this environment."""
    out = []
    for n in names:
        try:
            out.append(f"{n}=={md.version(n)}")
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {n} is not installed in {sys.prefix}; run `make setup` first "
                             "(the wheels take the versions the tests ran with)") from None
    return out


def wheel_requirements(path: str, python_version: str) -> list[str]:
    """The distribution names a wheel requires on the target (markers evaluated for Linux x86-64, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    names = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate(env):
            names.append(canonical(req.name))
    return names


def folder_size(out: str) -> tuple[int, int]:
    files = [p for p in glob.glob(os.path.join(out, "*")) if os.path.isfile(p)]
    return len(files), sum(os.path.getsize(p) for p in files)


def build(out: str, python_version: str, limit_mib: float, dry_run: bool = False) -> int:
    py = sys.executable
    built = pinned(BUILT)
    downloaded = pinned([n for n in (*ROOTS, *DEPENDENCIES) if n not in BUILT])
    wheel_cmd = [py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                 *[a for n in BUILT for a in ("--no-binary", n)], "-w", out, *built]
    download_cmd = [py, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp",
                    *[a for p in PLATFORMS for a in ("--platform", p)], "-d", out, *downloaded]
    if dry_run:
        print("DS_BUILD_OPS=0", " ".join(wheel_cmd))
        print(" ".join(download_cmd))
        return 0
    if os.path.isdir(out):                     # one version of each package: an old one beside a new one stops pip
        shutil.rmtree(out)
    os.makedirs(out)
    env = dict(os.environ, DS_BUILD_OPS="0")   # DeepSpeed compiles no C++/CUDA op into the wheel
    print(f"building {' '.join(built)} with DS_BUILD_OPS=0 ...", flush=True)
    subprocess.run(wheel_cmd, check=True, env=env)
    print(f"downloading {len(downloaded)} wheels for CPython {python_version}, manylinux x86-64 ...", flush=True)
    subprocess.run(download_cmd, check=True)
    with open(os.path.join(out, "requirements.txt"), "w") as f:
        f.write("# installed offline by devtools/gpu_check.py: pip install --no-index --find-links DIR -r this file\n")
        f.write("".join(line + "\n" for line in pinned(ROOTS)))
    with open(os.path.join(out, "requirements-nodeps.txt"), "w") as f:    # gpu_check's fallback, with --no-deps
        f.write("# the fallback when pip cannot resolve requirements.txt against the machine: every carried package,\n"
                "# installed with --no-deps; typing-extensions only when the machine's is older\n")
        f.write("".join((line.replace("==", ">=") if line.startswith("typing-extensions==") else line) + "\n"
                        for line in pinned((*ROOTS, *DEPENDENCIES))))

    wheels = sorted(glob.glob(os.path.join(out, "*.whl")))
    carried = {canonical(os.path.basename(w).split("-")[0]) for w in wheels}
    missing = set()
    for w in wheels:
        for req in wheel_requirements(w, python_version):
            if req not in carried and req not in IMAGE_PACKAGES:
                missing.add(f"{req} (needed by {os.path.basename(w).split('-')[0]})")
    for w in wheels:
        print(f"  {os.path.getsize(w) / MiB:7.2f} MiB  {os.path.basename(w)}")
    n, size = folder_size(out)
    print(f"{out}/: {n} files, {size / MiB:.1f} MiB (limit {limit_mib:g} MiB)")
    if missing:
        print("gpu_wheels: not carried and not on the GPU machine's package list: " + ", ".join(sorted(missing)),
              file=sys.stderr)
        return 1
    if size > limit_mib * MiB:
        print(f"gpu_wheels: {out}/ is {size / MiB:.1f} MiB, over the {limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="wheels", help="folder to (re)create (default: wheels)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    p.add_argument("--limit-mib", type=float, default=60.0, help="fail when the folder is larger (default: 60)")
    p.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    a = p.parse_args(argv)
    return build(a.out, a.python_version, a.limit_mib, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
