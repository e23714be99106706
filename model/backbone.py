"""Backbone choice of a run config: the project's own DiT, or a pretrained Wan2.1 transformer (model/wan.py).

``model.backbone: wan`` takes its shape from a WanTransformer3DModel config: ``model.wan.transformer`` (a
config.json-equivalent mapping in the YAML) or, when that is empty, ``config.json`` of the local download
``model.wan.pretrained``. Either way the resolved config is written back into ``model.wan.transformer``, so a
dumped run config or a weights folder's config.yaml rebuilds the same network without the download (the
weights folder holds every tensor, the new conditioning included). The pretrained tensors themselves are
read only when a training run starts from them (model/factory.py).

This module reads JSON only: diffusers is imported (through model/wan.py) when a Wan model is resolved or built.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BACKBONES = ("dit", "wan")


#################################################################################
#                                   Arguments                                   #
#################################################################################

@dataclass
class WanBackboneArgs:
    """Wan-only settings (the shared ones, chunk_frames, action_dim, camera and attention, are model.*)."""

    pretrained: str = ""           # local -Diffusers download (DIR/transformer/) or its transformer folder
    transformer: dict = field(default_factory=dict)   # WanTransformer3DModel config; {} = DIR's config.json
    camera_dim: int = 0            # prope: extra channels per head (multiple of 4; 0 = ChannelSplit.for_head rule)
    text_context: str = ""         # safetensors file with "context" [L, text_dim]; "" = one zero token (model/wan.py)

    def __post_init__(self):
        if self.camera_dim < 0 or self.camera_dim % 4:
            raise ValueError(f"camera_dim: expected a multiple of 4 >= 0, got {self.camera_dim!r}")


def resolve_wan_config(wan: WanBackboneArgs) -> dict:
    """The checked, filled Wan config (lists, not tuples, so it dumps as YAML), from the mapping or the folder."""
    from decmem.model.wan import check_config, read_wan_config, wan_folder

    if wan.transformer:
        cfg = check_config(wan.transformer, "model.wan.transformer")
    elif wan.pretrained:
        try:
            cfg = read_wan_config(wan_folder(wan.pretrained))
        except FileNotFoundError as e:
            raise ValueError(f"pretrained: {e}; or give the shape as model.wan.transformer") from None
    else:
        raise ValueError("pretrained: model.backbone=wan needs model.wan.pretrained (a local Wan -Diffusers folder) "
                         "or model.wan.transformer (its config.json values)")
    if cfg["patch_size"][1] != cfg["patch_size"][2]:
        raise ValueError(f"transformer: patch_size {list(cfg['patch_size'])}: expected square patches (1, p, p)")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def derived_shape(cfg: dict) -> dict:
    """ModelArgs fields a Wan config fixes (the trainer, dry run and data checks read them from model.*)."""
    return dict(dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], depth=cfg["num_layers"],
                n_heads=cfg["num_attention_heads"], patch_size=cfg["patch_size"][1],
                latent_channels=cfg["in_channels"], mlp_ratio=cfg["ffn_dim"] / (cfg["num_attention_heads"] *
                                                                               cfg["attention_head_dim"]))
