"""``decmem generate | eval | score``: roll a model out, evaluate it over a dataset, score existing rollouts."""
from __future__ import annotations

import argparse

from decmem.cli.common import fail, log, strategies
from decmem.evaluation.generate import generate
from decmem.evaluation.protocol import EvalArgs, parse_frames_for, run_eval
from decmem.evaluation.revisits import evaluate
from decmem.model.attention import STRATEGIES
from decmem.training.config import ConfigError


def cmd_generate(args) -> int:
    try:
        summary = generate(args.weights, args.clip, args.init_frames, args.frames, args.out, args.strategy,
                           args.steps, args.seed, args.device, args.teacher_forcing, args.save_bank,
                           overrides=list(args.overrides) + ([f"diffusion.action_cfg={args.action_cfg}"]
                                                             if args.action_cfg is not None else []))
    except (ValueError, FileNotFoundError, ConfigError) as e:      # a missing clip or weights, too many frames
        return fail(str(e))
    print(f"generated {summary['generated_latents']} latents with {summary['strategy']}: "
          f"{summary['seconds_per_latent_median']:.3f} s/latent (median), "
          f"PSNR vs ground truth {summary['psnr_generated_mean']:.2f} dB -> {args.out}/rollout.mp4, compare.mp4, frames.json")
    return 0


def cmd_eval(args) -> int:
    if args.clip or args.runs:
        return fail("`decmem eval` evaluates weights over a dataset (--weights W --data D); to score `decmem "
                    "generate` outputs use `decmem score --clip C --runs DIR...`")
    try:
        frames_for = dict(parse_frames_for(f) for f in args.frames_for)
        if len(frames_for) < len(args.frames_for):
            raise ValueError(f"--frames-for names a strategy twice: {' '.join(args.frames_for)}")
        ea = EvalArgs(weights=args.weights, data=args.data, init_frames=args.init_frames, frames=args.frames,
                      strategies=args.strategies or [], frames_for=frames_for, recall_every=args.recall_every,
                      clips=args.clips, sample_steps=args.steps or 0, seed=args.seed, device=args.device,
                      min_gap=args.min_gap, revisit_coverage=args.revisit_coverage, overlap=args.overlap,
                      relevance=args.relevance, block_overlap=args.block_overlap, depth_tol=args.depth_tol,
                      pos_tol=args.pos_tol, angle_tol_deg=args.angle_tol)
        res = run_eval(ea, args.out, log=log)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        return fail(str(e))
    with open(res["paths"]["eval.md"]) as f:
        print(f.read())
    return 0


def cmd_score(args) -> int:
    try:
        res = evaluate(args.clip, args.runs, args.out, pos_tol=args.pos_tol, angle_tol_deg=args.angle_tol,
                       min_gap=args.min_gap)
    except (ValueError, FileNotFoundError) as e:
        return fail(str(e))
    print(f"{res['revisit_count']} revisit frames of {res['generated_frames']} generated -> "
          f"{args.out}/report.md, eval.json, compare.mp4, revisits.png")
    return 0


def _add_revisit_args(p, protocol: bool) -> None:
    p.add_argument("--pos-tol", type=float, default=0.25,
                   help="max camera-centre distance for a pose revisit (clip pose units"
                        + ("; only clips without depth)" if protocol else ")"))
    p.add_argument("--angle-tol", type=float, default=20.0,
                   help="max viewing-direction angle for a pose revisit (degrees)")
    p.add_argument("--min-gap", type=int, default=8,
                   help="the init frame revisited must be at least this many frames older (not the local window's)")


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="roll a trained model out along a clip's camera path (mp4 + timings)",
                         description="Initialise the memory bank from the clip's first N ground-truth frames, generate "
                                     "M frames chunk by chunk along its camera path, encode each chunk into the bank "
                                     "once; write rollout.mp4, compare.mp4 (ground truth | generated), frames.json.")
    gen.add_argument("--weights", required=True, help="weights folder (model.safetensors + config.yaml)")
    gen.add_argument("--clip", required=True, help="canonical clip .npz, or a dataset / .tar shard (its first sample, or DATASET#KEY)")
    gen.add_argument("--init-frames", type=int, required=True, help="N: ground-truth latent frames put in the bank")
    gen.add_argument("--frames", type=int, required=True, help="M: latent frames to generate")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--strategy", choices=STRATEGIES, default=None, help="memory read (default: the weights' own)")
    gen.add_argument("--steps", type=int, default=None, help="Euler steps per chunk (default: the weights' own)")
    gen.add_argument("--action-cfg", type=float, default=None, metavar="S",
                     help="action classifier-free guidance scale (the paper: 7.5; needs a model trained with "
                          "diffusion.action_dropout > 0 and a clip with actions; default: the weights' own, 1 = off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--teacher-forcing", action="store_true",
                     help="put ground-truth chunks in the bank instead of generated ones (diagnostic)")
    gen.add_argument("--save-bank", default=None, help="also save the final memory bank (safetensors) here")
    gen.add_argument("overrides", nargs="*", metavar="key=value", help="weights-config overrides")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="revisit fidelity and retrieval recall of every strategy over many clips",
                        description="For each of --clips clips of --data, "
                                    "initialise the bank with --init-frames ground-truth latents, generate --frames "
                                    "along the true camera path with every strategy, and score PSNR/SSIM on revisited "
                                    "vs novel frames (depth + poses), recall@k of overlapping bank blocks, attention "
                                    "dispersion and seconds per chunk over the rollout, LPIPS if its weights are "
                                    "cached. Writes eval.json, eval.md, frames.png, dispersion.png, chunk_seconds.png, "
                                    "retrieval_heatmap.png. (`decmem score` scores existing `decmem generate` outputs.)")
    ev.add_argument("--weights", required=True, metavar="DIR | STRATEGY=DIR[,STRATEGY=DIR...]",
                    help="one weights folder (model.safetensors + config.yaml) that every strategy reads, "
                         "or one folder per strategy (separately trained models; same codec and latent geometry)")
    ev.add_argument("--data", required=True, help="dataset folder / prefix / shard, local or s3://")
    ev.add_argument("--init-frames", type=int, default=24, help="latents given to the model")
    ev.add_argument("--frames", type=int, default=16, help="latents generated")
    ev.add_argument("--strategies", type=strategies, default=None,
                    help="comma-separated strategies, in table order (default: the strategies --weights "
                         "names, or decmem,dense,dense_decay,fov_frames,window for one folder)")
    ev.add_argument("--frames-for", action="append", default=[], metavar="STRATEGY=M",
                    help="roll this strategy out for only M latents (a slow one, e.g. dense on CPU); its "
                         "metrics cover only those; repeatable")
    ev.add_argument("--recall-every", type=int, default=0, metavar="N",
                    help="score recall@k and the heatmaps on every N-th chunk only (default: every chunk "
                         "up to 32 chunks, else about 32 chunks spread over the rollout)")
    ev.add_argument("--clips", type=int, default=4, help="clips evaluated, first in shard order")
    ev.add_argument("--steps", type=int, default=0, help="sampling steps (default: the weights')")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--revisit-coverage", type=float, default=0.5,
                    help="revisited: at least this share of the frame's pixels seen by an older init frame")
    ev.add_argument("--relevance", choices=("block", "frame"), default="block",
                    help="relevant bank block, per query block: it holds >= --block-overlap of the query "
                         "block's own surface (block); or per query frame: >= --overlap of its pixels visible in the "
                         "frame's view (frame)")
    ev.add_argument("--block-overlap", type=float, default=0.1,
                    help="(protocol, block rule) share of the query block's pixels a relevant bank block holds")
    ev.add_argument("--overlap", type=float, default=0.25,
                    help="(protocol, frame rule) share of a relevant bank block's pixels visible in the query view")
    ev.add_argument("--depth-tol", type=float, default=0.1,
                    help="relative depth agreement for 'the same surface' (revisits and relevance)")
    ev.add_argument("--out", required=True, help="output folder")
    _add_revisit_args(ev, protocol=True)
    ev.add_argument("--clip", default=None, help=argparse.SUPPRESS)   # the old second form: a pointer to `score`
    ev.add_argument("--runs", nargs="+", default=None, help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_eval)

    sc = sub.add_parser("score", help="revisit PSNR/SSIM of `decmem generate` outputs of one clip (report.md)",
                        description="Score existing `decmem generate` outputs of one clip: a revisit is a generated "
                                    "frame whose camera is within --pos-tol / --angle-tol of an init frame at least "
                                    "--min-gap older; PSNR and SSIM on revisits and on all generated frames, seconds "
                                    "per latent. Writes compare.mp4, revisits.png, eval.json, report.md.")
    sc.add_argument("--clip", required=True,
                    help="canonical clip .npz, or a dataset / .tar shard (its first sample, or DATASET#KEY)")
    sc.add_argument("--runs", nargs="+", required=True, metavar="DIR",
                    help="`decmem generate` output folders, in table order")
    sc.add_argument("--out", required=True, help="output folder")
    _add_revisit_args(sc, protocol=False)
    sc.set_defaults(func=cmd_score)
