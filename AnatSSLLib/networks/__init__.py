"""Networks and their registry.

A cached encoder records an architecture name and its constructor arguments in its manifest;
:func:`build_network` rebuilds the module from those two. Register a new architecture by adding a
callable to :data:`ARCHITECTURES` (name -> callable taking the manifest's params as keywords).

Registered names:

- ``"ld_unet2d"``: :class:`LDNet` with ``spatial_dims=2`` (LD, 2D; VGG-tiny-like widths).
- ``"ld_unet3d"``: :class:`LDNet` with ``spatial_dims=3`` (LD, 3D; half widths by default).
- ``"alice_swin3d"``: :class:`~AnatSSLLib.networks.alice_net.AliceNet` (Alice, 3D, SwinUNETR-based).
- ``"awcl_resnet2d"``: :class:`~AnatSSLLib.networks.awcl_net.AWCLEncoder` (AWCL, 2D ResNet encoder;
  a whole-image encoder without dense features).

Alice and AWCL are imported on first use (SwinUNETR pulls in einops).
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


def _alice_swin3d(**params: Any) -> nn.Module:
    from .alice_net import build_alice_net

    return build_alice_net(**params)


def _awcl_resnet2d(**params: Any) -> nn.Module:
    from .awcl_net import awcl_resnet2d

    return awcl_resnet2d(**params)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "ld_unet2d": _ld_unet(2),
    "ld_unet3d": _ld_unet(3),
    "alice_swin3d": _alice_swin3d,
    "awcl_resnet2d": _awcl_resnet2d,
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
