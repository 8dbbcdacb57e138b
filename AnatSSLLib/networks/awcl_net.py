"""AWCL's network: a MONAI ResNet encoder (no classifier) and a two-layer projection head.

Adapted from the AWCL reference (Fu et al., ECCV-W 2022; ``JianboJiao/AWCL`` @ 7e92fe6, BSD-2;
METHODS.md §1): torchvision ResNet-18 with ``fc`` removed gives the 512-d representation ``h``
used downstream; ``Linear(512, 512)-ReLU-Linear(512, 128)`` then L2 normalisation gives ``z``,
used by the contrastive loss only. Here the ResNet is MONAI's (``monai.networks.nets.resnet``)
with a torchvision-like stem (7x7 convolution, stride 2, max pooling), so it runs in 2D (and, if
wanted, in 3D) and can swap BatchNorm for Instance/Group norm.

Two modules:

- :class:`AWCLEncoder`: the backbone alone, ``x (B, C, H, W) -> h (B, F)``; this is what the
  encoder cache stores (architecture ``"awcl_resnet2d"``) and what the downstream evaluation loads.
- :class:`AWCLNet`: encoder + projection head, ``encode(x) -> h``, ``forward(x) -> z (B, proj_dim)``
  with ``||z|| = 1``.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["AWCLEncoder", "AWCLNet", "BACKBONES", "awcl_resnet2d", "backbone_feature_dim"]

# name -> (block, layers); block "basic" has expansion 1, "bottleneck" 4
BACKBONES: dict[str, tuple[str, list[int]]] = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
_BASE_WIDTHS = (64, 128, 256, 512)


def backbone_feature_dim(backbone: str, widen_factor: float = 1.0) -> int:
    """Length of ``h`` for a backbone: 512 x ``widen_factor`` (basic blocks), 4x that (bottleneck)."""
    if backbone not in BACKBONES:
        raise InputError(f"AWCL backbone: expected one of {sorted(BACKBONES)}, got {backbone!r}")
    block, _ = BACKBONES[backbone]
    return int(_BASE_WIDTHS[-1] * float(widen_factor)) * (4 if block == "bottleneck" else 1)


def _replace_batchnorm(module: nn.Module, norm: str | tuple, spatial_dims: int) -> None:
    """Swap every BatchNorm in ``module`` for ``norm`` (MONAI 1.6's ResNet applies its ``norm``
    argument to the stem only; its residual blocks and shortcuts always get BatchNorm)."""
    from monai.networks.layers.utils import get_norm_layer

    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features))
        else:
            _replace_batchnorm(child, norm, spatial_dims)


class AWCLEncoder(nn.Module):
    """A MONAI ResNet without its classifier: image -> global representation ``h``.

    Args:
        spatial_dims: 2 (AWCL) or 3.
        in_channels: input channels (1 for grey MRI/ultrasound).
        backbone: ``"resnet10"``, ``"resnet18"`` (reference), ``"resnet34"`` or ``"resnet50"``.
        widen_factor: multiplies every stage's width (1.0 = standard; 0.25-0.5 for CPU scale-downs).
        norm: MONAI norm: ``"batch"`` (reference), ``"instance"`` or ``("group", {"num_groups": 8})``
            (batch-independent norms make multi-process CPU runs equal one-process runs).

    Input ``(B, in_channels, H, W)``, sides >= 32 px (five stride-2 steps); output ``(B, F)`` with
    ``F = backbone_feature_dim(backbone, widen_factor)`` (512 for resnet10/18/34).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        backbone: str = "resnet18",
        widen_factor: float = 1.0,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        from monai.networks.nets.resnet import ResNet

        if spatial_dims not in (2, 3):
            raise InputError(f"AWCLEncoder spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise InputError(f"AWCLEncoder in_channels: expected a positive integer, got {in_channels!r}")
        if not float(widen_factor) > 0:
            raise InputError(f"AWCLEncoder widen_factor: expected a positive number, got {widen_factor!r}")
        if isinstance(norm, list):  # a JSON round-trip of ("group", {"num_groups": 8})
            norm = tuple(norm)
        self.feature_dim = backbone_feature_dim(backbone, widen_factor)
        block, layers = BACKBONES[backbone]
        self.spatial_dims = int(spatial_dims)
        self.backbone = backbone
        self.resnet = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=list(_BASE_WIDTHS),
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=False,
            shortcut_type="B",
            widen_factor=float(widen_factor),
            feed_forward=False,
            bias_downsample=False,
            norm=norm,
        )
        if norm != "batch":
            _replace_batchnorm(self.resnet, norm, self.spatial_dims)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """Stem and the four stages' maps: strides 2 (stem, before pooling), 4, 8, 16, 32."""
        r = self.resnet
        x = r.act(r.bn1(r.conv1(x)))
        maps = [x]
        x = r.maxpool(x)
        for layer in (r.layer1, r.layer2, r.layer3, r.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> h (B, F)`` (global average of the last stage)."""
        return self.resnet(x)


class AWCLNet(nn.Module):
    """AWCL's network: :class:`AWCLEncoder` + projection ``Linear-ReLU-Linear`` + L2.

    Args:
        spatial_dims, in_channels, backbone, widen_factor, norm: see :class:`AWCLEncoder`.
        proj_hidden: hidden width of the projection head (reference: the feature length, 512 for
            ResNet-18; None = the feature length).
        proj_dim: length of ``z`` (reference 128).

    Example:
        >>> net = AWCLNet(backbone="resnet10")
        >>> net(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 128])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        backbone: str = "resnet18",
        proj_hidden: int | None = 512,
        proj_dim: int = 128,
        widen_factor: float = 1.0,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        self.encoder = AWCLEncoder(spatial_dims, in_channels, backbone, widen_factor, norm)
        f = self.encoder.feature_dim
        proj_hidden = f if proj_hidden is None else proj_hidden
        for name, value in (("proj_hidden", proj_hidden), ("proj_dim", proj_dim)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"AWCLNet {name}: expected a positive integer, got {value!r}")
        self.projection = nn.Sequential(nn.Linear(f, proj_hidden), nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.encoder_params: dict[str, Any] = {
            "spatial_dims": int(spatial_dims),
            "in_channels": int(in_channels),
            "backbone": backbone,
            "widen_factor": float(widen_factor),
            "norm": norm if isinstance(norm, str) else list(norm),
        }

    @property
    def feature_dim(self) -> int:
        """Length of ``h``."""
        return self.encoder.feature_dim

    def encode(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> h (B, F)``: the downstream representation."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> z (B, proj_dim)``, unit L2 norm (for the contrastive loss)."""
        return F.normalize(self.projection(self.encoder(x)), dim=1)


def awcl_resnet2d(**params: Any) -> AWCLEncoder:
    """Registry factory of the cached AWCL encoder (2D): ``AWCLEncoder(spatial_dims=2, **params)``."""
    params = dict(params)
    given = params.pop("spatial_dims", 2)
    if int(given) != 2:
        raise InputError(f"awcl_resnet2d params: spatial_dims must be 2, got {given!r}")
    return AWCLEncoder(spatial_dims=2, **params)
