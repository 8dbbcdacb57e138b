"""A cached encoder made ready for inference, and the preprocessing its manifest asks for.

A cache entry holds weights and a manifest (:mod:`AnatSSLLib.cache`); this module rebuilds the
network named by the manifest (:func:`AnatSSLLib.networks.build_network`), loads the weights,
and brings an :class:`~AnatSSLLib.image.Image` onto the grid and intensity scale the encoder was
trained on:

- resampled to the manifest's ``spacing`` on an axis-aligned LPS grid (identity direction), so
  every volume reaches the network in the same anatomical orientation whatever its acquisition
  direction was;
- intensities normalised as the manifest's ``intensity`` entry says (robust percentiles to
  ``[0, 1]`` by default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import InputError
from .image import Image, check_volume

__all__ = ["LoadedEncoder", "load_encoder", "normalise_intensity", "to_encoder_grid"]

DEFAULT_INTENSITY = {"kind": "percentile", "lower": 0.5, "upper": 99.5}


@dataclasses.dataclass
class LoadedEncoder:
    """A network in eval mode with the manifest and id it came from."""

    encoder_id: str
    manifest: Any  # AnatSSLLib.cache.EncoderManifest
    model: Any  # torch.nn.Module
    device: Any  # torch.device

    @property
    def spatial_dims(self) -> int:
        return int(self.manifest.spatial_dims)

    @property
    def spacing(self) -> tuple[float, ...] | None:
        return None if self.manifest.spacing is None else tuple(float(s) for s in self.manifest.spacing)

    @property
    def method(self) -> str:
        return str(self.manifest.method)


def load_encoder(encoder: str | None = None, *, cache=None, device: str = "auto") -> LoadedEncoder:
    """Load a cached encoder by id, unique prefix or name (``None``: the bundled default).

    Raises:
        CacheError: unknown id, or a weights file that fails its checksum.
        InputError: no encoder given and no default encoder is bundled.
    """
    from .cache import EncoderCache
    from .device import resolve_device
    from .networks import build_network

    cache = cache if cache is not None else EncoderCache()
    if encoder is None:
        encoder = cache.default_encoder_id()
        if encoder is None:
            raise InputError("no encoder given and no default encoder is bundled; pass --encoder ID (see `anatssl cache list`)")
    encoder_id = cache.resolve(encoder)
    state, manifest = cache.load(encoder_id)
    model = build_network(manifest.architecture, dict(manifest.architecture_params))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        from .errors import CacheError

        raise CacheError(
            f"encoder {encoder_id}: weights do not fit architecture {manifest.architecture!r} "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    dev = resolve_device(device)
    model.to(dev).eval()
    return LoadedEncoder(encoder_id, manifest, model, dev)


def normalise_intensity(array: np.ndarray, intensity: dict | None = None) -> np.ndarray:
    """Map voxel values to the encoder's input scale (float32).

    ``{"kind": "percentile", "lower": p, "upper": q}`` clips to the p-th and q-th percentiles of
    the volume and rescales to ``[0, 1]``; ``{"kind": "window", "min": a, "max": b}`` does the
    same with fixed bounds (e.g. CT in HU).
    """
    spec = dict(DEFAULT_INTENSITY if not intensity else intensity)
    a = np.asarray(array, dtype=np.float32)
    kind = spec.get("kind", "percentile")
    if kind == "percentile":
        lo, hi = np.percentile(a, [float(spec.get("lower", 0.5)), float(spec.get("upper", 99.5))])
    elif kind == "window":
        lo, hi = float(spec["min"]), float(spec["max"])
    else:
        raise InputError(f"unknown intensity normalisation {kind!r}; expected 'percentile' or 'window'")
    if not hi > lo:
        raise InputError("the volume has no contrast to normalise (its intensity range is empty)")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_encoder_grid(image: Image, spacing: tuple[float, ...] | None, *, interpolator: str = "linear") -> Image:
    """Resample ``image`` onto an axis-aligned grid (identity direction) with ``spacing`` mm.

    The new grid covers the physical bounding box of the input. With ``spacing=None`` the input's
    own spacing is kept (the grid is still axis-aligned). Voxels outside the input get the
    input's minimum value.
    """
    import SimpleITK as sitk

    nd = image.ndim
    spacing = tuple(image.spacing) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != nd:
        raise InputError(f"{image.name}: encoder spacing {spacing} does not fit a {nd}D image")
    size = np.asarray(image.size)
    corners = np.array(np.meshgrid(*[[0.0, s - 1.0] for s in size], indexing="ij")).reshape(nd, -1).T
    phys = image.index_to_physical(corners)
    lo, hi = phys.min(axis=0), phys.max(axis=0)
    new_size = np.maximum(np.floor((hi - lo) / np.asarray(spacing) + 1e-6).astype(int) + 1, 1)
    if np.allclose(image.direction, np.eye(nd)) and np.allclose(image.spacing, spacing):
        return image
    ref = sitk.Image([int(s) for s in new_size], sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(lo))
    ref.SetDirection(tuple(np.eye(nd).ravel()))
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}[interpolator]
    src = image.to_sitk()
    if interpolator != "nearest":
        src = sitk.Cast(src, sitk.sitkFloat32)
    out = sitk.Resample(src, ref, sitk.Transform(), interp, float(np.min(image.array)))
    return Image.from_sitk(out, name=image.name)


def prepare_volume(image: Image, encoder: LoadedEncoder) -> tuple[Image, np.ndarray]:
    """Check, resample and normalise ``image`` for ``encoder``.

    Returns the resampled image (its geometry maps network voxels back to mm) and the normalised
    float32 array indexed ``[k, j, i]``.
    """
    check_volume(image, ndim=encoder.spatial_dims, name=image.name)
    grid = to_encoder_grid(image, encoder.spacing)
    return grid, normalise_intensity(grid.array, getattr(encoder.manifest, "intensity", None))


def encoder_for_tool(
    encoder: str | LoadedEncoder | None, tool: str, *, device: str = "auto", random_weights: bool = False
) -> LoadedEncoder:
    """A loaded 3D encoder for ``tool`` (named in the error): ``encoder`` as given or loaded from the
    cache by id / name (None: the default), optionally with :func:`random_weights_like`.

    Raises:
        InputError: the encoder is not 3D.
    """
    enc = encoder if isinstance(encoder, LoadedEncoder) else load_encoder(encoder, device=device)
    if enc.spatial_dims != 3:
        raise InputError(f"encoder {enc.encoder_id} is {enc.spatial_dims}D; {tool} needs a 3D encoder")
    return random_weights_like(enc) if random_weights else enc


def random_weights_like(encoder: LoadedEncoder, seed: int = 0) -> LoadedEncoder:
    """The same architecture and preprocessing as ``encoder`` with freshly initialised weights.

    The benchmarks' "random-weight encoder" baseline: what the tools achieve from the network's
    inductive bias alone, without pretraining.
    """
    import torch

    from .networks import build_network

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_network(encoder.manifest.architecture, dict(encoder.manifest.architecture_params))
    finally:
        torch.random.set_rng_state(generator_state)
    model.to(encoder.device).eval()
    return LoadedEncoder(f"{encoder.encoder_id}-random{seed}", encoder.manifest, model, encoder.device)
