"""What one submitit task runs: the ``train`` entry point as one rank of the job, and the requeue after preemption."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zlib

import submitit

from decmem.training.config import load_config
from decmem.training.run_config import RunConfig
from decmem.training.trainer import train

log = logging.getLogger("decmem.slurm")


def job_port(job_id: str) -> int:
    """A rendezvous port from the job id: the same on every task and across requeues of one job."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 20000


class TrainJob:
    """A picklable callable: ``decmem train`` of the config frozen at submission, as this task's rank."""

    def __init__(self, config_file: str):
        self.config_file = config_file

    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        os.environ.update(MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(job_port(env.job_id)),
                          RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks))
        cfg = load_config(RunConfig, self.config_file)
        print(f"decmem job {env.job_id}: rank {env.global_rank}/{env.num_tasks} (local {env.local_rank}) on "
              f"{env.hostname}, master {env.hostnames[0]}:{os.environ['MASTER_PORT']}", flush=True)
        outcome = train(cfg)
        print(f"decmem job {env.job_id}: rank {env.global_rank} finished training: {outcome}", flush=True)
        if outcome == "requeue" and env.cluster == "slurm":
            if env.global_rank == 0:
                # every rank has saved this step; put the job back in the queue, it resumes from `latest`
                subprocess.run(["scontrol", "requeue", str(env.job_id)], check=True, timeout=60)
                print(f"decmem job {env.job_id}: requeued", flush=True)
                # leave without a result file (SystemExit is not caught by submitit): the job is not over
                sys.exit(75)
            return {"outcome": outcome, "rank": env.global_rank}
        return {"outcome": outcome, "rank": env.global_rank, "run_dir": cfg.run_dir}
