"""Pretraining methods, one file each: the method's views/sampler, heads glue and losses.

- :mod:`.ld`: LD, unsupervised local discrimination (Chen et al., TPAMI 2023).
"""

from __future__ import annotations

from .ld import (
    LDLoss,
    LDTask,
    LDViews,
    Pooling,
    Stage,
    apply_flip_rot90,
    area_balance_loss,
    average_patches,
    centre_weighted_patches,
    cluster_centres,
    entropy_loss,
    gaussian_pool_at,
    gaussian_smooth_embedding,
    ld_training_step,
    make_ld_batch,
    mixup_loss,
    patch_discrimination_loss,
    pixel_region_loss,
    region_discrimination_loss,
    region_embeddings,
    undo_flip_rot90,
)

__all__ = [
    "LDLoss",
    "LDTask",
    "LDViews",
    "Pooling",
    "Stage",
    "apply_flip_rot90",
    "area_balance_loss",
    "average_patches",
    "centre_weighted_patches",
    "cluster_centres",
    "entropy_loss",
    "gaussian_pool_at",
    "gaussian_smooth_embedding",
    "ld_training_step",
    "make_ld_batch",
    "mixup_loss",
    "patch_discrimination_loss",
    "pixel_region_loss",
    "region_discrimination_loss",
    "region_embeddings",
    "undo_flip_rot90",
]
