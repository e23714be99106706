"""The run config: one dataclass composing every component's ``...Args``.

Later components (model, data, trainer, slurm) add their own ``...Args`` here;
``configs/*.yaml`` set any subset of keys and ``key=value`` overrides the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.loader import DataArgs
from model.diffusion import DiffusionArgs
from model.dit import ModelArgs
from training.bench_memory import MemoryProbeArgs
from training.checkpoint import CheckpointArgs
from training.config import register_root
from training.metrics import LogArgs
from training.optim import OptimArgs
from training.trainer import TrainArgs

DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class AttentionBenchArgs:
    """One attention layer over a synthetic bank, timed per strategy and bank size."""

    dim: int = 256                   # model width D
    n_heads: int = 4
    frame_h: int = 16                # token grid of one latent frame (N_f = frame_h * frame_w)
    frame_w: int = 16
    chunk_frames: int = 2            # C: frames in the query chunk
    batch: int = 1
    repeats: int = 7                 # timed repeats per point (the median is reported)
    warmup: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False           # time forward + backward instead of forward only
    threads: int = 0                 # torch intra-op threads, 0 = torch's default

    def __post_init__(self):
        for key in ("dim", "n_heads", "frame_h", "frame_w", "chunk_frames", "batch", "repeats"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim: expected a multiple of n_heads={self.n_heads}, got {self.dim!r}")


@dataclass
class GenerateBenchArgs:
    """Streaming generation over a pre-filled bank, timed per strategy and bank size."""

    latent_h: int = 32               # latent frame size (pixels codec: the frame size)
    latent_w: int = 32
    sample_steps: int = 10           # Euler steps per chunk
    chunks: int = 3                  # timed chunks per point (the median per latent is reported)
    warmup_chunks: int = 1
    threads: int = 0
    dtype: str = "float32"           # bfloat16 on a GPU
    device: str = "cpu"

    def __post_init__(self):
        for key in ("latent_h", "latent_w", "sample_steps", "chunks"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {self.dtype!r}")


@register_root
@dataclass
class RunConfig:
    """A DecMem run: every component's arguments, resolved and dumped into the run directory."""

    name: str = "decmem"
    run_dir: str = "runs/decmem"
    seed: int = 0
    model: ModelArgs = field(default_factory=ModelArgs)
    diffusion: DiffusionArgs = field(default_factory=DiffusionArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    log: LogArgs = field(default_factory=LogArgs)
    bench: AttentionBenchArgs = field(default_factory=AttentionBenchArgs)
    bench_generate: GenerateBenchArgs = field(default_factory=GenerateBenchArgs)
    bench_memory: MemoryProbeArgs = field(default_factory=MemoryProbeArgs)
