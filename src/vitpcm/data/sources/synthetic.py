"""The built-in synthetic dataset (``vitpcm data synth``, :mod:`vitpcm.data.synth`).

It is written in the VOC layout with a ``classes.txt``, so ``voc12`` converts it as well;
nothing is downloaded.
"""

from __future__ import annotations

from vitpcm.data.sources.voc12 import VocLayout

SYNTH_CLASSES: tuple[str, ...] = ("background", "disc", "triangle", "square", "ring", "star")
"""Class names by label index."""


class Synthetic(VocLayout):
    """Generated shapes on clutter, in the VOC layout."""

    name = "synthetic"
    class_names = SYNTH_CLASSES
    config = "synthetic"


SOURCE = Synthetic()
