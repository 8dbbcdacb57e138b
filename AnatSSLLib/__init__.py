"""AnatSSL: anatomy-aware self-supervised representations for medical images.

The library behind the AnatSSL 3D Slicer extension: image I/O in physical space, the encoder
cache, pretraining methods (AWCL, LD, Alice) and the tools built on a cached encoder (one-shot
landmarks, cross-modality segmentation, embedding similarity search). It imports neither Qt nor
Slicer; heavy dependencies (torch, MONAI) are imported by the modules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import AnatSSLError, CacheError, InputError

__all__ = ["__version__", "AnatSSLError", "CacheError", "InputError"]
