"""ViT-PCM: weakly supervised semantic segmentation with ViT and global max pooling."""

__version__ = "0.1.0"
