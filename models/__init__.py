"""Pure torch models and math for arpipe.

Imports torch, numpy, einops and nothing of ours but ``models``: no files, ranks or tracking.

Shape-suffix legend for long-lived tensors (``tokens_BL``, ``logits_BLV``, ``f_BChw``):
    B  batch                     L  sequence length (tokens)
    V  vocabulary / codebook     C  channels / embedding width
    H, W  image height, width    h, w  latent height, width
    K  number of scales          D  codebook vector dimension
"""
