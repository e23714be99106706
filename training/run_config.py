"""The run config: one dataclass composing every component's ``...Args``.

Later components (model, data, trainer, slurm) add their own ``...Args`` here;
``configs/*.yaml`` set any subset of keys and ``key=value`` overrides the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from decmem.data_pipeline.loader import DataArgs
from decmem.model.diffusion import DiffusionArgs
from decmem.model.dit import ModelArgs
from decmem.training.checkpoint import CheckpointArgs
from decmem.training.config import register_root
from decmem.training.metrics import LogArgs
from decmem.training.optim import OptimArgs
from decmem.training.trainer import TrainArgs

DTYPES = ("float32", "float64", "bfloat16", "float16")

# The benchmark sections (bench, bench_generate, bench_memory) are declared here, not in bench/, because a run
# config is one YAML schema that every stage reads (configs/debug.yaml has a bench section and trains): their
# code lives in bench/, which imports training/, never the reverse.


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


@dataclass
class MemoryProbeArgs:
    """The exact-revisit probe: task geometry, training length and evaluation."""

    bank_frames: int = 12            # F: textured frames in the bank, one camera each
    yaw_deg: float = 30.0            # yaw between consecutive bank cameras
    pitch_levels: int = 1            # rings of cameras at different pitch, for banks longer than one turn of yaw
    pitch_deg: float = 15.0          # pitch between rings
    fov_deg: float = 60.0            # horizontal and vertical field of view
    latent_h: int = 16               # frame size (pixels codec: 3 channels)
    latent_w: int = 16
    texture_cells: int = 4           # smoothness: textures are bicubic upsamplings of cells x cells noise
    steps: int = 1000                # training steps per run
    batch: int = 1                   # samples per step
    lr: float = 1e-3                 # AdamW, constant after warmup
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 100
    eval_samples: int = 16
    taus: tuple = (0.3, 0.6, 0.9)    # τ at which held-out velocity loss is reported (recall at the largest)
    seeds: int = 1                   # repeats of every run (model init and data stream seed + i; same held-out set)
    threads: int = 0                 # torch threads per run process (0: cores / jobs)

    def __post_init__(self):
        for key in ("bank_frames", "latent_h", "latent_w", "texture_cells", "steps", "batch", "eval_every",
                    "eval_samples", "seeds"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)!r}")
        ring = round(360 / self.yaw_deg) if self.yaw_deg > 0 else 1
        if self.bank_frames > ring * self.pitch_levels:
            raise ValueError(f"bank_frames={self.bank_frames}: only {ring} x {self.pitch_levels} distinct cameras with "
                             f"yaw_deg={self.yaw_deg:g} and pitch_levels={self.pitch_levels}; two bank frames with one "
                             "camera would make the source ambiguous (raise pitch_levels)")
        if not self.taus or not all(0 < t < 1 for t in self.taus):
            raise ValueError(f"taus: expected values in (0, 1), got {self.taus!r}")
        self.taus = tuple(float(t) for t in self.taus)


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
