"""A real one-node SLURM on localhost (Debian's slurmctld + slurmd + munge), for tests and CI.

    python -m devtools.local_cluster start DIR     # write DIR/slurm.conf, start munged, slurmctld, slurmd; wait idle
    python -m devtools.local_cluster stop DIR      # stop them by the PIDs in DIR
    eval $(python -m devtools.local_cluster env DIR)   # export SLURM_CONF for sinfo / sbatch / submitit

No accounting daemon: ``sacct`` does not exist here, so code that waits on a job
polls ``squeue`` / ``scontrol`` with a deadline (slurm/jobs.py) instead of
submitit's ``result()``, which would wait forever on a job that died.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

CONF = """\
ClusterName=decmem-local
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def conf_path(d: str) -> str:
    return os.path.join(os.path.abspath(d), "slurm.conf")


def _env(d: str) -> dict:
    return dict(os.environ, SLURM_CONF=conf_path(d))


def is_up(d: str) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=_env(d), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip().rstrip("*") in ("idle", "mixed", "allocated") for s in out.stdout.split())


def start(d: str, timeout_s: float = 60) -> str:
    """Bring the cluster up (idempotent); returns the path of slurm.conf."""
    for exe in ("slurmctld", "slurmd", "munged", "sinfo"):
        if shutil.which(exe) is None and not os.path.exists(f"/usr/sbin/{exe}"):
            raise RuntimeError(f"{exe} not found: install Debian's slurmctld slurmd slurm-client munge "
                               "(make sysdeps does)")
    d = os.path.abspath(d)
    if is_up(d):
        return conf_path(d)
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    host = socket.gethostname().split(".")[0]
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    with open(conf_path(d), "w") as f:
        f.write(CONF.format(host=host, dir=d, cpus=os.cpu_count() or 1, mem_mb=mem_mb,
                            ctld_port=6817, d_port=6818))
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        open(os.path.join(d, "munged.started"), "w").close()      # ours: stop() stops it too
    env = _env(d)
    subprocess.run(["slurmctld", "-f", conf_path(d)], env=env, check=True)
    subprocess.run(["slurmd", "-f", conf_path(d)], env=env, check=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if is_up(d):
            return conf_path(d)
        time.sleep(0.5)
    raise RuntimeError(f"the local SLURM did not become idle within {timeout_s:.0f} s; see {d}/slurmctld.log "
                       f"and {d}/slurmd.log")


def stop(d: str) -> None:
    """Stop slurmd and slurmctld by their PID files, and munged if start() started it."""
    d = os.path.abspath(d)
    pid_files = [os.path.join(d, f"{name}.pid") for name in ("slurmd", "slurmctld")]
    if os.path.exists(os.path.join(d, "munged.started")):
        pid_files.append("/run/munge/munged.pid")
    for pid_file in pid_files:
        if not os.path.exists(pid_file):
            continue
        try:
            pid = int(open(pid_file).read().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (ProcessLookupError, ValueError):
            pass


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("start", "stop", "env", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, d = args
    if cmd == "start":
        print(start(d))
    elif cmd == "stop":
        stop(d)
    elif cmd == "env":
        print(f"export SLURM_CONF={conf_path(d)}")
    else:
        print("up" if is_up(d) else "down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
