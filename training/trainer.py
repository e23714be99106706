"""``decmem train``: DeepSpeed ZeRO-3 over a dp x cp grid, exact resume, TensorBoard."""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
import zlib
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import yaml

from decmem.data_pipeline import storage
from decmem.data_pipeline.loader import ShardLoader, resolve_shards
from decmem.model.diffusion import DiffusionArgs
from decmem.model.factory import build_model
from decmem.model.rollout import rollout
from decmem.training.checkpoint import (
    TrainState,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from decmem.training.checkpoint_guard import describe_write_error
from decmem.training.config import dump_config, to_dict
from decmem.training.context_parallel import CPMemory, Layout, build_groups, cp_scalars
from decmem.training.distributed import RunFailed, collective_device, init_distributed, peer_lost, resolve_device
from decmem.training.engine import ShardedEMA, build_engine, gather_state_dict
from decmem.training.faults import maybe_fail, maybe_kill, maybe_nan
from decmem.training.metrics import MetricLogger
from decmem.training.sequence_parallel import BLOCK_READS, SPMemory
from decmem.training.validate import resolve_precision, validate
from decmem.training.visuals import add_gif, add_heatmap, retrieval_heatmap, side_by_side_gif, to_rgb_frames
from decmem.training.weights import save_weights

PRECISIONS = ("auto", "fp32", "bf16")
CP_QUERIES = ("replicated", "sharded")


@dataclass
class TrainArgs:
    """The training loop and its distribution (DeepSpeed ZeRO-3, dp x cp)."""

    steps: int = 1000                # optimizer steps
    grad_accum: int = 1              # micro-batches per optimizer step (DeepSpeed's gradient accumulation)
    cp: int = 1                      # context-parallel group size: ranks that share one sample's memory bank
    cp_queries: str = "replicated"   # the query stream under cp: replicated (every rank runs every target chunk,
                                     # partial outputs merged) or sharded (each rank runs its own chunks and fetches
                                     # only their selected blocks and windows; training/sequence_parallel.py)
    cp_block_read: str = "fetch"     # sharded queries: fetch (selected blocks' K/V come to the chunk's owner) or
                                     # ship (its query blocks go to the blocks' holders, (out, lse) come back)
    zero_stage: int = 3
    zero3_persistence: int = 100_000  # ZeRO-3 keeps parameters of fewer elements whole on every rank (DeepSpeed's
                                     # stage3_param_persistence_threshold); 0 partitions every one
    precision: str = "auto"          # auto = bf16 on GPU, fp32 on CPU
    device: str = "auto"             # auto | cpu | cuda
    activation_checkpointing: bool = False  # recompute each block in backward (any zero_stage)
    ema: float = 0.0                 # EMA decay of the weights (0 = off), e.g. 0.999
    stop_at: int = 0                 # save and stop once this step is done (0 = run to steps); the schedule still spans steps
    max_nonfinite: int = 3           # steps in a row with a non-finite loss (each skipped) before the run saves and stops
    threads: int = 0                 # torch intra-op threads per process (0 = torch's default)
    timeout_s: int = 300             # a collective waiting longer than this fails the job instead of hanging

    def __post_init__(self):
        for key in ("steps", "grad_accum", "cp", "timeout_s", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected >= 1, got {getattr(self, key)}")
        if self.stop_at < 0:
            raise ValueError(f"stop_at: expected >= 0, got {self.stop_at}")
        if self.cp_queries not in CP_QUERIES:
            raise ValueError(f"cp_queries: expected one of {CP_QUERIES}, got {self.cp_queries!r}")
        if self.cp_block_read not in BLOCK_READS:
            raise ValueError(f"cp_block_read: expected one of {BLOCK_READS}, got {self.cp_block_read!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        if self.zero3_persistence < 0:
            raise ValueError(f"zero3_persistence: expected >= 0 (parameter elements), got {self.zero3_persistence}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: expected in [0, 1), got {self.ema}")


log = logging.getLogger("decmem.train")


class NonFiniteLoss(RuntimeError):
    """The loss stayed non-finite: the run saved its unchanged weights and stopped."""


def sample_generators(seed: int, step: int, keys: list[str]) -> list[torch.Generator]:
    """One noise generator per sample from (seed, step, sample key): the same noise in any dp x cp layout or batching."""
    return [torch.Generator().manual_seed(zlib.crc32(f"{seed}/{step}/{k}".encode())) for k in keys]


#################################################################################
#                                    Trainer                                    #
#################################################################################

class Trainer:
    """One rank's training loop: built once, ``fit()`` runs to train.steps (or to a stop signal)."""

    def __init__(self, cfg, rank: int, world: int, device: str):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        t = cfg.train
        self.precision = resolve_precision(t.precision, device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.layout = Layout.make(world, t.cp, rank)
        self.comm_device = collective_device()         # where the job's own flags and sums meet (NCCL: the GPU)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.engine, self.scheduler = build_engine(cfg, world, self.precision)
        cp_group, _ = build_groups(self.layout)
        ctx_cls = functools.partial(SPMemory, read=t.cp_block_read) if t.cp_queries == "sharded" else CPMemory
        self.ctx = ctx_cls(cp_group, self.layout.cp_rank, self.layout.cp) if self.layout.cp > 1 else None
        self.loader = ShardLoader(cfg.data, cfg.model.chunk_frames, self.layout.dp_rank, self.layout.dp)
        self.ema = ShardedEMA(self.engine.module, t.ema) if t.ema > 0 else None
        self.state = TrainState(layout={"world": world, "dp": self.layout.dp, "cp": self.layout.cp})
        self.samples_per_step = self.layout.dp * t.grad_accum * cfg.data.batch_size
        self.stop_signal = 0
        self._val_clip = None
        self.frame_hw = None                                # latent frame size, known after the first batch
        self._last_save = self._fit_started = None          # fit() sets them: its save clock, its start

    # ----------------------------------------------------------------------------
    # Set-up helpers
    # ----------------------------------------------------------------------------

    def restore(self) -> str | None:
        """Resume per checkpoint.resume; returns the folder resumed from (None: fresh start)."""
        path = resolve_resume(self.cfg.run_dir, self.cfg.checkpoint.resume)
        if path is None:
            return None
        self.state = load_checkpoint(self.engine, path, self.rank, self.state.layout)
        self.loader.load_state_dict(self.state.loader)
        set_rng_state(self.state.rng)
        if self.ema is not None:
            if not self.state.ema:
                raise ValueError(f"{path} has no EMA state but train.ema={self.cfg.train.ema}; resume with train.ema=0")
            for n, s in self.state.ema.items():
                self.ema.shadow[n].copy_(s)
        return path

    def install_signal_handlers(self) -> None:
        """SIGUSR2 (SLURM's warning before a time limit / preemption) and SIGTERM: save at the next step, stop.

        These replace submitit's own handlers, which would checkpoint from rank 0 alone: here every rank
        learns of the signal through the step's all-reduce and all save the same step together.
        """
        def handler(signum, frame):
            self.stop_signal = signum
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, handler)

    # ----------------------------------------------------------------------------
    # One optimizer step
    # ----------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        out = dict(batch)
        out["latents"] = batch["latents"].to(self.device, self.dtype)
        for k in ("K", "c2w"):
            out[k] = batch[k].to(self.device, torch.float32)
        if "actions" in batch:
            out["actions"] = batch["actions"].to(self.device, self.dtype)
        return out

    def train_step(self, micro_batches: list[dict], with_stats: bool = False) -> tuple[dict, dict]:
        """Forward/backward every micro-batch through the engine, then its optimizer step -> (scalars, last stats)."""
        if len(micro_batches) != self.cfg.train.grad_accum:
            raise ValueError(f"{len(micro_batches)} micro-batches for train.grad_accum={self.cfg.train.grad_accum}")
        if self.ctx is not None:
            self.ctx.reset_bytes()
        losses, stats = [], {}
        own_history = self._own_history(micro_batches[0]["latents"].shape[1])
        for i, mb in enumerate(micro_batches):
            mb = self._to_device(mb)
            gens = sample_generators(self.cfg.seed, self.state.step, mb["keys"])
            loss, stats = self.engine(mb["latents"], mb["K"], mb["c2w"], mb["chunk_starts"], gens, mb.get("actions"),
                                      self.ctx, with_stats and i == len(micro_batches) - 1, own_history)
            loss = maybe_nan(loss, self.rank, self.state.step + 1)
            maybe_kill(self.rank, self.state.step + 1)
            if not self._all_finite(loss):
                # DeepSpeed checks gradients for overflow only in fp16; in fp32/bf16 one NaN would reach the weights
                self.state.step += 1
                if len(micro_batches) > 1:
                    raise NonFiniteLoss(
                        f"step {self.state.step}: non-finite loss (micro-batch {i}, samples {mb['keys']} on rank "
                        f"{self.rank} or another); with train.grad_accum > 1 the gradients already accumulated "
                        "cannot be taken back through the engine, so the run stops here: resume from the last "
                        "checkpoint (check the data, or lower optim.lr)")
                log.warning("step %d: non-finite loss (samples %s on this rank or another): step skipped, "
                            "weights unchanged", self.state.step, mb["keys"])
                return {"train/skipped_steps": 1.0, "memory/bank_tokens": float(stats.get("bank_tokens", 0))}, {}
            # read now: _all_finite has synced on this forward, while after backward .item() would wait for it
            losses.append(loss.detach().float().item())
            self.engine.backward(loss)
            self.engine.step()                           # DeepSpeed steps the optimizer at the accumulation boundary
        if self.ema is not None:
            self.ema.update()
        self.state.step += 1
        h, w = micro_batches[0]["latents"].shape[-2:]
        self.frame_hw = (h, w)
        scalars = {"train/loss": sum(losses) / len(losses), "train/lr": self.scheduler.get_last_lr()[0],
                   "train/skipped_steps": 0.0, "train/own_history": float(own_history is not None),
                   "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                   "memory/bank_tokens": float(stats.get("bank_tokens", 0))}
        for key in ("gate_sgm", "gate_alm", "gate_coarse", "entropy"):
            if key in stats:
                scalars[f"attention/{key}"] = float(stats[key])
        for key in ("dispersion_low", "dispersion_high"):       # the paper's dispersion: mass on weights < .02 / > .05
            if key in stats:
                scalars[f"attention/{key}"] = float(stats[key].mean())
        if self.ctx is not None:
            scalars.update(cp_scalars(self.ctx.bytes_moved(), stats.get("cp_load", {}), len(micro_batches),
                                      self.cfg.model.depth))
        ls = self.loader.stats                           # cumulative counts of what the loader skipped
        for key in ("bad_samples", "short_samples", "corrupt_shards", "missing_shards", "read_retries",
                    "read_retry_wait_s"):
            scalars[f"data/{key}"] = float(ls.get(key, 0))
        return scalars, stats

    def _own_history(self, frames: int) -> tuple[int, int] | None:
        """This step's span of generated history (DiffusionArgs.self_history), or None: one draw from (seed, step)
        and a span fixed by the config and clip length, the same on every rank (ZeRO-3: every rank must run the
        same forwards)."""
        p = self.cfg.diffusion.self_history
        if p <= 0:
            return None
        g = sample_generators(self.cfg.seed, self.state.step, ["self_history"])[0]
        if torch.rand((), generator=g).item() >= p:
            return None
        return self.cfg.data.min_context, frames - self.cfg.model.chunk_frames

    # ----------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------

    def fit(self) -> str:
        """Train to train.steps -> "done"; or, after saving the step: "requeue" (SIGUSR2 on any rank: preemption or
        time limit, the launcher should requeue), "stopped" (SIGTERM, or train.stop_at reached)."""
        cfg, t = self.cfg, self.cfg.train
        logger = MetricLogger(cfg.log, cfg.run_dir, self.rank, self.world, t.steps, self.state.step)
        self._last_save = time.monotonic()
        self._fit_started = (self.state.train_seconds, time.monotonic())   # train_seconds spans every restart
        outcome, bad_run = "done", 0
        try:
            while self.state.step < t.steps:
                step = self.state.step + 1                   # the step being taken (1-based, as logged)
                maybe_fail(self.rank, step)
                t0 = time.perf_counter()
                micro = [self.loader.next_batch() for _ in range(t.grad_accum)]
                t_data = time.perf_counter() - t0
                want_map = bool(cfg.log.heatmap_every) and step % cfg.log.heatmap_every == 0
                scalars, stats = self.train_step(micro, with_stats=want_map or step % cfg.log.every_steps == 0)
                bad_run = self._stop_after_nonfinite_run(bad_run, scalars, step)
                scalars.update({"perf/step_seconds": time.perf_counter() - t0, "perf/data_seconds": t_data})
                tokens = self._count_consumed(micro[0])
                self._log_metrics(logger, step, scalars, tokens)
                self._write_images(logger.writer, step, stats, micro[-1], want_map)
                requeue, stop, due = self._agree_stop_save(step)
                if stop or due or self._periodic_save(step) or step == t.steps:
                    self._save()
                if stop:
                    outcome = "requeue" if requeue else "stopped"
                    if self.rank == 0:
                        why = f"signal {self.stop_signal}" if self.stop_signal else f"train.stop_at={t.stop_at}"
                        log.warning("%s: saved step %d, stopping", why, step)
                    break
        finally:
            logger.close()
            self.loader.close()
        return outcome

    # ----------------------------------------------------------------------------
    # The loop's parts, in the order it calls them
    # ----------------------------------------------------------------------------

    def _stop_after_nonfinite_run(self, bad_run: int, scalars: dict, step: int) -> int:
        """Steps skipped in a row so far; at train.max_nonfinite, save (the last good weights) and raise."""
        t = self.cfg.train
        bad_run = bad_run + 1 if scalars["train/skipped_steps"] else 0
        if bad_run >= t.max_nonfinite:
            self._save()                                     # nothing was applied since the last good step
            raise NonFiniteLoss(
                f"{bad_run} steps in a row (up to step {step}) had a non-finite loss and were skipped "
                f"(train.max_nonfinite={t.max_nonfinite}); saved step {step}, whose weights are those of the "
                "last good update, and stopped: check the data (loader stats in TensorBoard) or lower optim.lr")
        return bad_run

    def _count_consumed(self, batch: dict) -> int:
        """Add the step's samples and tokens (all dp ranks) to the train state -> the step's tokens."""
        tokens = self.samples_per_step * self.cfg.data.clip_frames * self._tokens_per_frame(batch)
        self.state.samples += self.samples_per_step
        self.state.tokens += tokens
        return tokens

    def _log_metrics(self, logger: MetricLogger, step: int, scalars: dict, tokens: int) -> None:
        """Collective at log steps (the means over steps and ranks): rank 0 writes them and moves the bar."""
        logger.add(scalars)
        if step % self.cfg.log.every_steps == 0 or step == self.cfg.train.steps:
            means = logger.log(step)
            extra = {"perf/tokens_per_s": tokens / max(means["perf/step_seconds"], 1e-9),
                     "data/samples_seen": float(self.state.samples)}
            means.update(extra)                              # TensorBoard and metrics.jsonl carry the same keys
            if logger.writer is not None:
                for k, v in extra.items():
                    logger.writer.add_scalar(k, v, step)
            logger.write_line(step, means)
            logger.progress(step, means)
        else:
            logger.progress(step)

    def _write_images(self, writer, step: int, stats: dict, batch: dict, want_map: bool) -> None:
        """The retrieval heatmap at log.heatmap_every steps; a rollout (collective) at log.rollout_every steps."""
        if want_map and writer is not None and "layers" in stats:
            self._write_heatmap(writer, stats, batch, step)
        if self.cfg.log.rollout_every and step % self.cfg.log.rollout_every == 0:
            self._write_rollout(writer, step)

    def _agree_stop_save(self, step: int) -> tuple[bool, bool, bool]:
        """Collective, once per step -> (requeue, stop, save due by the clock): a signal on any rank, train.stop_at,
        or rank 0's checkpoint.every_minutes period."""
        ck = self.cfg.checkpoint
        flags = [float(self.stop_signal == signal.SIGUSR2), float(self.stop_signal != 0),
                 float(self.rank == 0 and ck.every_minutes > 0 and
                       time.monotonic() - self._last_save >= 60 * ck.every_minutes)]
        if self.world > 1:
            agreed = torch.tensor(flags, device=self.comm_device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()                          # one device-to-host read, not one per flag
        return bool(flags[0]), bool(flags[1]) or step == self.cfg.train.stop_at, bool(flags[2])

    def _periodic_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and step % every == 0

    def _save(self) -> None:
        """Collective: the step's checkpoint, with this rank's loader cursor, RNG and EMA shard."""
        cfg = self.cfg
        start_seconds, t_start = self._fit_started
        self.state.loader = self.loader.state_dict()
        self.state.rng = rng_state()
        self.state.train_seconds = start_seconds + time.monotonic() - t_start
        if self.ema is not None:
            self.state.ema = {n: s.clone() for n, s in self.ema.shadow.items()}
        export = self.export_weights if cfg.checkpoint.export_weights else None
        save_checkpoint(self.engine, cfg.run_dir, self.state, self.rank, cfg.checkpoint.keep,
                        {"name": cfg.name, "precision": self.precision}, export)
        self._last_save = time.monotonic()

    def _all_finite(self, loss) -> bool:
        """Whether every rank's loss is finite (agreed by an all-reduce, so all ranks skip or step together)."""
        # built on the device from the loss itself: the one host read is the .item() below
        ok = torch.isfinite(loss.detach()).all().reshape(1).to(self.comm_device, torch.float32)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _tokens_per_frame(self, batch: dict) -> int:
        h, w = batch["latents"].shape[-2:]
        return (h // self.cfg.model.patch_size) * (w // self.cfg.model.patch_size)

    # ----------------------------------------------------------------------------
    # Exports and pictures (rank 0 writes; gathering weights is collective)
    # ----------------------------------------------------------------------------

    def export_weights(self, ckpt_dir: str) -> list[str]:
        """Collective: step-N/weights/ (and weights-ema/) in the `decmem generate` format -> write errors (rank 0).

        A failed write (a full disk) is reported, not raised: every rank must still take part in the next gather.
        """
        errors = []
        for sub, ema in (("weights", None), ("weights-ema", self.ema)):
            if sub == "weights-ema" and ema is None:
                continue
            sd = gather_state_dict(self.engine.module, self.rank, ema)
            if self.rank == 0 and not errors:
                out = os.path.join(ckpt_dir, sub)
                try:
                    save_weights(self.engine.module.model, out, self.cfg.diffusion,
                                 codec=self._codec, frame_hw=self._frame_pixels(), state_dict=sd,
                                 model_args=self.cfg.model)
                except Exception as e:
                    errors.append(describe_write_error(os.path.join(out, "model.safetensors"), e))
        return errors

    @functools.cached_property
    def _codec(self) -> str:
        """The codec the dataset was preprocessed with, from its manifest (read once); every '::' source must agree."""
        codecs = {}
        for source in self.cfg.data.data.split("::"):
            first = resolve_shards(source.strip())[0]
            manifest = storage.join(first.rsplit("/", 1)[0], "manifest.json")
            try:
                codecs[source] = json.loads(storage.read_bytes(manifest)).get("config", {}).get("codec", "pixels")
            except Exception as e:
                if not storage.is_missing(e):   # a storage error must not label autoencoder-trained weights as pixels
                    raise
                codecs[source] = "pixels"       # a shard pattern without a manifest: the loader decoded mp4 frames
        if len(set(codecs.values())) > 1:
            raise ValueError(f"data.data: the sources were preprocessed with different codecs ({codecs}); "
                             "latents of different codecs cannot be trained together")
        return next(iter(codecs.values()))

    def _frame_pixels(self) -> list[int]:
        return list(self.frame_hw) if self.frame_hw and self._codec == "pixels" else [0, 0]

    def _write_heatmap(self, writer, stats: dict, batch: dict, step: int) -> None:
        layers = [s for s in stats["layers"] if "selected" in s]
        if not layers:
            return
        bank = max(batch["chunk_starts"])
        n_b = self._tokens_per_frame(batch) // self.cfg.model.attention.block_size
        mat = retrieval_heatmap(layers, self.cfg.model.chunk_frames, n_b, bank)
        add_heatmap(writer, "retrieval/heatmap_query_frame_x_bank_frame", mat, step)

    def _write_rollout(self, writer, step: int) -> None:
        """Collective gather of the weights; rank 0 rolls a held-out clip out and logs it next to ground truth."""
        sd = gather_state_dict(self.engine.module, self.rank, self.ema)
        if self.rank != 0:
            return
        model = build_model(self.cfg.model)                # every tensor comes from sd
        model.load_state_dict(sd)
        model.eval()
        clip = self._validation_clip()
        n_new = self.cfg.log.rollout_frames
        lat = clip["latents"].float()
        N = lat.shape[1] - n_new
        args = DiffusionArgs(**{**vars(self.cfg.diffusion), "sample_steps": self.cfg.log.rollout_steps})
        res = rollout(model, args, lat[:, :N], clip["K"], clip["c2w"], n_new, clip.get("actions"),
                      torch.Generator().manual_seed(self.cfg.seed))
        gen, gt = res.latents[0, N:], lat[0, N:]
        mse = (gen - gt).pow(2).mean().item()
        writer.add_scalar("rollout/mse_vs_ground_truth", mse, step)
        add_gif(writer, "rollout/ground_truth_vs_generated", side_by_side_gif(to_rgb_frames(gt), to_rgb_frames(gen)), step)
        writer.flush()

    def _validation_clip(self) -> dict:
        """The first sample of the dataset under a fixed seed: the same clip at every rollout, on resume too."""
        if self._val_clip is None:
            args = replace(self.cfg.data, batch_size=1, prefetch=0, seed=self.cfg.data.seed + 1)
            loader = ShardLoader(args, self.cfg.model.chunk_frames, 0, 1)
            self._val_clip = loader.next_batch()
            loader.close()
        return self._val_clip


#################################################################################
#                                  Entry Point                                  #
#################################################################################

def train(cfg) -> str:
    """Run (or resume) one training job in this process, as one rank of the launcher's world."""
    device = resolve_device(cfg.train.device)
    rank, _, world = init_distributed(device, cfg.train.timeout_s)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    try:
        return _train(cfg, rank, world, device)
    except RunFailed:
        raise
    except RuntimeError as e:             # a collective failed because another rank died: say so in one line
        lost = peer_lost(e, rank)
        if lost is None:
            raise
        raise lost from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, rank: int, world: int, device: str) -> str:
    """Build the trainer, resume, dump the config (rank 0) and fit."""
    for warning in validate(cfg, world):      # errors were raised before launch; warnings belong in the run's log
        if rank == 0:
            log.warning("config: %s", warning)
    trainer = Trainer(cfg, rank, world, device)
    resumed = trainer.restore()
    if rank == 0:
        path = os.path.join(cfg.run_dir, "config.yaml")
        if os.path.exists(path):              # a resume with a changed config keeps the old one beside it
            with open(path) as f:
                if yaml.safe_load(f) != to_dict(cfg):
                    os.replace(path, os.path.join(cfg.run_dir, f"config.before-step-{trainer.state.step}.yaml"))
        dump_config(cfg, path)
        lay = trainer.layout
        log.info("world %d = dp %d x cp %d, %s on %s, %s", world, lay.dp, lay.cp, trainer.precision, device,
                 f"resumed from {resumed} at step {trainer.state.step}" if resumed else "fresh start")
    trainer.install_signal_handlers()
    return trainer.fit()
