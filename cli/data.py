"""``decmem preprocess``: source videos + cameras -> WebDataset shards + manifest."""
from __future__ import annotations

from decmem.cli.common import fail
from decmem.data_pipeline.preprocess import BadInputError, PreprocessArgs, parse_resolution, parse_size, preprocess
from decmem.data_pipeline.sources import FORMATS


def cmd_preprocess(args) -> int:
    try:
        pargs = PreprocessArgs(format_name=args.format, resolution=parse_resolution(args.resolution), fps=args.fps,
                               segment_frames=args.segment_frames, shard_bytes=parse_size(args.shard_bytes),
                               codec=args.codec, workers=args.workers, strict=args.strict,
                               min_segment_frames=args.min_segment_frames, deterministic=not args.fast_encode)
        m = preprocess(args.input, args.output, pargs, progress=not args.quiet)
    except BadInputError as e:           # --strict: the first bad input's reason, as one line
        return fail(f"{e} (--strict stops at the first bad input; inputs finished before it are published)", 1)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:     # a missing input, a bad size or spec
        return fail(str(e))
    return 0 if m["samples"] or not m["skipped"] else 1


def add_parsers(sub) -> None:
    pre = sub.add_parser("preprocess", help="source videos + cameras -> WebDataset shards + manifest (local or s3://)",
                         description="Read INPUT in its source's own format, convert to canonical clips (K in pixels, "
                                     "c2w in OpenCV axes), cut into segments and write shards + manifest.json to "
                                     "OUTPUT (a folder or s3://bucket/prefix). Re-running resumes; bad inputs are "
                                     "skipped and recorded in the manifest (fatal with --strict).")
    pre.add_argument("--format", required=True, choices=FORMATS, help="source format of INPUT")
    pre.add_argument("input", metavar="INPUT", help="source folder (render/synthetic: a spec like scenes=4,frames=128)")
    pre.add_argument("output", metavar="OUTPUT", help="dataset folder or s3://bucket/prefix")
    pre.add_argument("--resolution", default=None, metavar="HxW", help="centre-crop to the aspect, then resize")
    pre.add_argument("--fps", type=float, default=None, help="subsample to about this frame rate")
    pre.add_argument("--segment-frames", type=int, default=None, metavar="N", help="frames per sample (default: whole clip)")
    pre.add_argument("--min-segment-frames", type=int, default=8, metavar="N", help="drop shorter tails (default 8)")
    pre.add_argument("--shard-bytes", default="1GB", metavar="SIZE", help="target shard size, e.g. 512MB (default 1GB)")
    pre.add_argument("--codec", default="pixels", help="pixels, or autoencoder:DIR to precompute latents")
    pre.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    pre.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    pre.add_argument("--fast-encode", action="store_true",
                     help="x264 with its assembly kernels: ~4x faster encoding, shard bytes may vary between runs")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)
