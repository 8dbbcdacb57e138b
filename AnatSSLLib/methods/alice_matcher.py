"""An anatomical matcher between training volumes for Alice's cross-volume view mining.

Alice mines a view pair by taking a random point in volume A and asking an anatomical-embedding
model (SAM in the paper) for its counterpart in volume B, with a similarity score; pairs below
0.7 are retried (:func:`AnatSSLLib.methods.alice.mine_views`). Here the model is one of our cached
3D encoders (an LD encoder by default), used through the landmark tool
(:class:`~AnatSSLLib.tools.landmarks.LandmarkLocator`: a dense embedding correspondence per pair
of volumes, computed once and kept, then read at the point; the score is the cosine similarity at
the match).

The training arrays carry no geometry of their own: each is treated as a volume on an axis-aligned
grid of the pretraining spacing (origin 0), which is what :class:`~AnatSSLLib.datasets.VolumeCrops`
made of them; points are voxel indices ``(k, j, i)`` as :func:`mine_views` gives and takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..image import Image
from ..points import PointSet

__all__ = ["EncoderMatcher"]


class EncoderMatcher:
    """``matcher(a, b, point_kji) -> (point_kji in b, score)`` through a cached encoder.

    Args:
        encoder: a loaded 3D encoder (:func:`AnatSSLLib.encoders.load_encoder`).
        volumes: the training arrays ``D, H, W`` (as :class:`~AnatSSLLib.methods.alice.AliceTask` gets them).
        spacing: their voxel size in mm (x, y, z).

    Raises:
        InputError: a 2D encoder, or a volume that is not 3D.
    """

    def __init__(self, encoder, volumes: Sequence[np.ndarray], spacing: Sequence[float]) -> None:
        from ..embedding import EmbeddingStore
        from ..tools.landmarks import LandmarkLocator

        if encoder.spatial_dims != 3:
            raise InputError(f"Alice view mining needs a 3D encoder as matcher; {encoder.encoder_id} is {encoder.spatial_dims}D")
        self.images = []
        for n, v in enumerate(volumes):
            if np.ndim(v) != 3:
                raise InputError(f"Alice view mining: volume {n} is not 3D (shape {np.shape(v)})")
            self.images.append(Image(np.asarray(v, np.float32), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0),
                                     np.eye(3), f"volume {n}"))
        self.locator = LandmarkLocator(EmbeddingStore(encoder, max_volumes=len(self.images) + 1))
        self.encoder_id = encoder.encoder_id

    def __call__(self, a: int, b: int, point_kji: np.ndarray) -> tuple[np.ndarray, float]:
        ref, tgt = self.images[a], self.images[b]
        lps = ref.index_to_physical(np.asarray(point_kji, float)[::-1][None])
        (found,) = self.locator.locate(ref, PointSet(["p"], lps), [tgt])
        index = tgt.physical_to_index(found.positions)[0][::-1]
        return np.clip(index, 0, np.array(tgt.array.shape) - 1), float(found.confidence[0])
