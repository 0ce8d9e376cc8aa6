"""The ViT backbones a config can name, each with its public checkpoint: one table.

Everything that knows a backbone by name reads :data:`BACKBONES`: the config fills and
checks ``model.patch_size`` ... ``model.mlp_dim`` and ``model.pos_embed_grid`` from it
(:mod:`vitpcm.config.validation`), :meth:`ViTBackbone.from_preset
<vitpcm.model.vit_backbone.ViTBackbone.from_preset>` builds it, ``vitpcm weights fetch``
offers the entries that have a checkpoint (:mod:`vitpcm.model.pretrained`), and
:mod:`vitpcm.run_plan` recognises their checkpoints' file names. Adding a backbone is one
entry here (plus a config YAML that names it, to train it).

The checkpoints are Google's (``storage.googleapis.com/vit_models``): ViT-B/16 and L/16
ImageNet-21k + ImageNet-1k (Dosovitskiy et al., ICLR 2021) and AugReg ViT-S/16 (Steiner et
al., "How to train your ViT?", 2021), all fine-tuned at 384 px.

This module imports nothing else of the project, so the config can read it without
TensorFlow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

OFFICIAL_BASE = "https://storage.googleapis.com/vit_models"
# The ``model.backbone`` value of a config that gives every dimension itself.
CUSTOM = "custom"
DIMS = ("patch_size", "hidden_dim", "depth", "num_heads", "mlp_dim")
# Google's file names start with the model's name: "ViT-B_16.npz", "S_16-i21k-300ep-...npz".
_GOOGLE_FILE = re.compile(r"^(?:ViT-)?([A-Za-z]+_\d+)(?:[-_.]|$)")


@dataclass(frozen=True)
class Backbone:
    """One backbone preset: its dimensions and the public checkpoint it starts from.

    Attributes:
        name: the ``model.backbone`` value and ``vitpcm weights fetch`` name.
        patch_size: side of a square patch in pixels.
        hidden_dim: token width.
        depth: number of encoder blocks.
        num_heads: attention heads per block.
        mlp_dim: hidden width of a block's MLP.
        google_name: the model's name in Google's file names (``B_16`` in ``ViT-B_16.npz``);
            empty when it has none.
        pretrain_size: the image size its checkpoint was fine-tuned at: the position
            embedding is stored on a ``pretrain_size // patch_size`` grid.
        path: the checkpoint's path under :data:`OFFICIAL_BASE`.
        file: the file name ``weights fetch`` writes (and looks up under ``--mirror``);
            empty when there is no checkpoint to fetch.
        description: what the checkpoint is.
        sha256: the checkpoint's known digest (Google publishes none).
    """

    name: str
    patch_size: int
    hidden_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    google_name: str = ""
    pretrain_size: int = 384
    path: str = ""
    file: str = ""
    description: str = ""
    sha256: str | None = None

    @property
    def dims(self) -> dict[str, int]:
        """``{patch_size, hidden_dim, depth, num_heads, mlp_dim}``: the ``model`` dimensions."""
        return {dim: getattr(self, dim) for dim in DIMS}

    @property
    def pos_embed_grid(self) -> int:
        """The side of the position grid the checkpoint stores."""
        return self.pretrain_size // self.patch_size

    @property
    def url(self) -> str:
        """The checkpoint's official URL."""
        return f"{OFFICIAL_BASE}/{self.path}"


_S16 = (
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03"
    "-res_384.npz"
)
BACKBONES: dict[str, Backbone] = {
    entry.name: entry
    for entry in (
        Backbone("vit_ti16", 16, 192, 12, 3, 768, "Ti_16"),
        Backbone(
            "vit_s16", 16, 384, 12, 6, 1536, "S_16", path=f"augreg/{_S16}", file=_S16,
            description="AugReg ViT-S/16, ImageNet-21k + ImageNet-1k, 384 px (voc12_vit_s16)",
        ),
        Backbone(
            "vit_b16", 16, 768, 12, 12, 3072, "B_16",
            path="imagenet21k+imagenet2012/ViT-B_16.npz",
            file="ViT-B_16_imagenet21k+imagenet2012.npz",
            description="ViT-B/16, ImageNet-21k + ImageNet-1k, 384 px (voc12_vit_b16, "
            "coco14_vit_b16)",
        ),
        Backbone(
            "vit_l16", 16, 1024, 24, 16, 4096, "L_16",
            path="imagenet21k+imagenet2012/ViT-L_16.npz",
            file="ViT-L_16_imagenet21k+imagenet2012.npz",
            description="ViT-L/16, ImageNet-21k + ImageNet-1k, 384 px",
        ),
        Backbone("vit_b8", 8, 768, 12, 12, 3072, "B_8"),
    )
}  # fmt: skip


def fetchable() -> dict[str, Backbone]:
    """The entries of :data:`BACKBONES` with a public checkpoint, by name."""
    return {name: entry for name, entry in BACKBONES.items() if entry.file}


def checkpoint_backbone(uri: str) -> str | None:
    """The backbone whose Google checkpoint ``uri``'s file name is (``vit_b16``), or None."""
    match = _GOOGLE_FILE.match(PurePosixPath(uri.split("?", 1)[0]).name)
    named = [e.name for e in BACKBONES.values() if match and e.google_name == match.group(1)]
    return named[0] if named else None
