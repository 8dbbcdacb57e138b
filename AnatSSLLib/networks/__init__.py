"""Networks and their registry.

A cached encoder records an architecture name and its constructor arguments in its manifest;
:func:`build_network` rebuilds the module from those two. Register a new architecture by adding a
callable to :data:`ARCHITECTURES` (name -> callable taking the manifest's params as keywords).

Registered names:

- ``"ld_unet2d"``: :class:`LDNet` with ``spatial_dims=2`` (LD, 2D; VGG-tiny-like widths).
- ``"ld_unet3d"``: :class:`LDNet` with ``spatial_dims=3`` (LD, 3D; half widths by default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import InputError
from .ld_net import DEFAULT_FEATURES_2D, DEFAULT_FEATURES_3D, LDNet, LDOutput


def _ld_unet(spatial_dims: int) -> Callable[..., nn.Module]:
    def build(**params: Any) -> nn.Module:
        params = dict(params)
        given = params.pop("spatial_dims", spatial_dims)
        if int(given) != spatial_dims:
            raise InputError(
                f"ld_unet{spatial_dims}d params: spatial_dims must be {spatial_dims}, got {given!r}"
            )
        return LDNet(spatial_dims=spatial_dims, **params)

    build.__name__ = f"ld_unet{spatial_dims}d"
    build.__doc__ = f"LDNet(spatial_dims={spatial_dims}, **params)."
    return build


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "ld_unet2d": _ld_unet(2),
    "ld_unet3d": _ld_unet(3),
}


def build_network(architecture: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the registered ``architecture`` with keyword ``params`` (e.g. from a cache manifest).

    Raises:
        InputError: unknown architecture name (the message lists the known ones) or parameters
            the architecture does not accept.
    """
    try:
        factory = ARCHITECTURES[architecture]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ARCHITECTURES))
        raise InputError(f"architecture: unknown name {architecture!r}; known: {known}") from None
    try:
        return factory(**dict(params or {}))
    except TypeError as exc:
        raise InputError(f"architecture {architecture!r}: bad params {dict(params or {})!r}: {exc}") from exc


__all__ = [
    "ARCHITECTURES",
    "build_network",
    "LDNet",
    "LDOutput",
    "DEFAULT_FEATURES_2D",
    "DEFAULT_FEATURES_3D",
]
