"""The one place a network is built from ``model.*``: the trainer, weights export/load, dry run, generate and
eval all call ``build_model`` (so a new backbone is wired once)."""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from decmem.model.dit import ModelArgs, VideoDiT

# attention settings that change how the bank is read, not which parameters exist (stage 1 -> stage 2 changes them)
READ_ONLY = ("strategy", "top_k", "window", "decay", "fov_frames", "fov_age_penalty", "backend", "sparse_backend")

#################################################################################
#                                    Factory                                    #
#################################################################################


def wan_args(args: ModelArgs):
    """model.* -> model/wan.py's WanArgs (the shared fields come from model.*, the Wan-only ones from model.wan)."""
    from decmem.model.wan import WanArgs

    return WanArgs(pretrained=args.wan.pretrained, chunk_frames=args.chunk_frames, action_dim=args.action_dim,
                   camera=args.camera, camera_dim=args.wan.camera_dim, text_context=args.wan.text_context,
                   attention=args.attention)


def build_model(args: ModelArgs, load_pretrained: bool = False) -> nn.Module:
    """The network of ``args`` at its initial values; ``load_pretrained``: Wan's tensors from model.wan.pretrained.

    Without ``load_pretrained`` a Wan model is built from model.wan.transformer alone (a weights folder then
    overwrites every tensor, or a dry run counts it on the meta device): the download is not needed.
    """
    if args.backbone == "dit":
        return VideoDiT(args)
    from decmem.model.wan import DecMemWan, load_wan_weights, wan_folder

    model = DecMemWan(args.wan.transformer, wan_args(args))
    if load_pretrained:
        if not args.wan.pretrained:
            raise ValueError("model.wan.pretrained: empty; a Wan run starts from a local Wan -Diffusers folder "
                             "(or from checkpoint.init_weights)")
        load_wan_weights(model, wan_folder(args.wan.pretrained))
    return model


def same_network(a: ModelArgs, b: ModelArgs) -> bool:
    """Whether weights trained under ``a`` are the network of ``b``: equal but for how attention reads the bank
    (strategy, sizes, kernels: parameters depend on the merge, not the strategy) and where Wan's download lies."""
    def core(m: ModelArgs) -> dict:
        d = dataclasses.asdict(m)
        d["wan"].pop("pretrained")
        for key in READ_ONLY:
            d["attention"].pop(key)
        return d
    return core(a) == core(b)
