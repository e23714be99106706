"""Local stand-ins for infrastructure, for tests, CI and benchmarks; not installed with the package.

Standard library only at import time: ``.ci/run`` runs ``python3 -m devtools.local_cluster`` with the system
Python, from the repository root, before anything is installed.
"""
