"""ViT-PCM network, losses and label merge.

Import the submodules directly (``vitpcm.model.vitpcm``, ``vitpcm.model.losses``, ...): this
package imports nothing so that ``import vitpcm.model`` stays free of TensorFlow.
"""
