"""LD network: a U-Net with a unit-norm per-voxel embedding head and a K-way soft cluster head.

Chen et al., "Unsupervised local discrimination for medical images", IEEE TPAMI 2023
(arXiv 2108.09440), section "network"; reference code ``HuaiChen-1994/LDLearning`` @ 72f5a74,
``models/my_models.py`` (``decoder``) and ``models/vgg.py`` (``vgg16_bn_tiny``, config "G").
Our own code, written from METHODS.md section 2.1.

Relation to the paper's network:

- Paper: encoder VGG-16-BN "tiny" (widths 16-16 | 32-32 | 64-64-64 | 128-128-128 | 128-128-128,
  four 2x2 max-pools used), U-Net decoder (upsample x2, concatenate the skip, 2 x conv3-BN-ReLU), and
  the heads read the last concatenation (32 channels at full resolution).
- Here: MONAI's :class:`~monai.networks.nets.BasicUNet` with the same per-level widths
  ``features = (16, 32, 64, 128, 128, 32)`` (2D default), ReLU + batch norm as in VGG-BN, and
  parameter-free (bilinear / trilinear) upsampling like the reference's ``nn.Upsample``.
  Differences, all deliberate: two (not three) convolutions at the three deepest levels, and two
  convolutions at full resolution after the last concatenation (the reference feeds the
  concatenation straight into the heads). About 1.15 M parameters in 2D (the reference is
  about 1 M). The 3D default halves the deeper widths, ``(16, 16, 32, 64, 64, 16)``, to run on
  CPU (about 0.9 M parameters with 3D kernels). No layer has 8 input channels: on CPU, oneDNN's
  3D convolution backward with 8 input channels is some 50x slower than with 16 (measured:
  11.6 s against 0.15 s for one 3x3x3 layer on 10 x 32^3), which also argues for K = 16.
- Heads, as in the reference: embedding = conv3(F->D)-BN-ReLU-conv3(D->D), then per-voxel L2
  normalisation (D = 32); clusters = conv3(F->K)-BN-ReLU-conv3(K->K), sigmoid, then L1
  normalisation over the K channels (K = 16 for pretraining).

Padding (our option, not in the paper): ``padding_mode="zeros"`` (default, as the reference)
pads every convolution with zeros; ``"reflect"`` mirrors the feature map instead. Zero padding
lets a CNN tell how far a voxel lies from the input's border (Islam et al., ICLR 2020, "How much
position information do convolutional neural networks encode?"), and a 3D U-Net's receptive field
reaches the borders of a training crop from everywhere, so patch discrimination can be solved by
position in the crop instead of anatomy (measured: ``benchmarks/probe_shift_equivariance.py``).

Input sizes: every spatial size must be divisible by 16 (four 2x2(x2) poolings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..errors import InputError

__all__ = ["LDNet", "LDOutput", "DEFAULT_FEATURES_2D", "DEFAULT_FEATURES_3D", "PADDING_MODES", "SIZE_DIVISOR"]

DEFAULT_FEATURES_2D: tuple[int, ...] = (16, 32, 64, 128, 128, 32)
DEFAULT_FEATURES_3D: tuple[int, ...] = (16, 16, 32, 64, 64, 16)
SIZE_DIVISOR = 16
PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate")
_EPS = 1e-10


class LDOutput(NamedTuple):
    """What :class:`LDNet` returns.

    embedding: ``B, D, *spatial``, unit L2 norm at every voxel.
    assignment: ``B, K, *spatial``, non-negative, sums to 1 over K at every voxel.
    """

    embedding: torch.Tensor
    assignment: torch.Tensor


def _head(spatial_dims: int, in_channels: int, width: int) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(in_channels, width, kernel_size=3, padding=1),
        norm(width),
        nn.ReLU(inplace=True),
        conv(width, width, kernel_size=3, padding=1),
    )


class LDNet(nn.Module):
    """U-Net (MONAI BasicUNet) with LD's embedding and clustering heads, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for MRI / X-ray).
        features: six widths of the BasicUNet levels (encoder 1..5, last decoder level); default
            ``DEFAULT_FEATURES_2D`` in 2D, ``DEFAULT_FEATURES_3D`` in 3D.
        embedding_dim: D, the length of the per-voxel embedding (paper: 32).
        num_clusters: K, the number of soft clusters (paper: 16 for pretraining, 8 shape-guided).
        padding_mode: how every convolution pads its input, one of :data:`PADDING_MODES`
            (default ``"zeros"``, as the reference; see the module docstring).

    Raises:
        InputError: bad ``spatial_dims``, ``features``, ``embedding_dim``, ``num_clusters`` or ``padding_mode``.

    Note:
        Both outputs are float32 (also under CUDA autocast). Every spatial size of the input must be divisible by 16; ``forward`` raises
        :class:`~AnatSSLLib.errors.InputError` otherwise (crop or pad the input first).

    Example::

        >>> net = LDNet(spatial_dims=2)
        >>> out = net(torch.zeros(2, 1, 64, 64))
        >>> tuple(out.embedding.shape), tuple(out.assignment.shape)
        ((2, 32, 64, 64), (2, 16, 64, 64))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        features: Sequence[int] | None = None,
        embedding_dim: int = 32,
        num_clusters: int = 16,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        if spatial_dims not in (2, 3):
            raise InputError(f"LDNet spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        if features is None:
            features = DEFAULT_FEATURES_2D if spatial_dims == 2 else DEFAULT_FEATURES_3D
        features = tuple(int(f) for f in features)
        if len(features) != 6 or min(features) < 1:
            raise InputError(f"LDNet features: expected six positive widths, got {features!r}")
        if int(in_channels) < 1 or int(embedding_dim) < 1 or int(num_clusters) < 1:
            raise InputError(
                "LDNet in_channels, embedding_dim and num_clusters must be positive, got "
                f"{in_channels!r}, {embedding_dim!r}, {num_clusters!r}"
            )
        if padding_mode not in PADDING_MODES:
            raise InputError(f"LDNet padding_mode: expected one of {', '.join(PADDING_MODES)}, got {padding_mode!r}")
        self.spatial_dims = int(spatial_dims)
        self.padding_mode = padding_mode
        self.in_channels = int(in_channels)
        self.features = features
        self.embedding_dim = int(embedding_dim)
        self.num_clusters = int(num_clusters)

        backbone = BasicUNet(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=1,
            features=features,
            act=("relu", {"inplace": True}),
            norm=("batch", {"affine": True}),
            upsample="nontrainable",
        )
        backbone.final_conv = nn.Identity()  # the heads below replace MONAI's 1x1 output conv
        self.backbone = backbone
        self.embedding_head = _head(self.spatial_dims, features[5], self.embedding_dim)
        self.cluster_head = _head(self.spatial_dims, features[5], self.num_clusters)
        for module in self.modules():  # MONAI's blocks take no padding mode: set it on every convolution
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                module.padding_mode = padding_mode
                if padding_mode == "zeros" and isinstance(module, nn.Conv3d) and any(module.padding):
                    # Same zeros, padded by F.pad before an unpadded convolution: bit-identical output,
                    # and on the CPU (oneDNN) the padded 3D convolution's backward is much slower
                    # (benchmarks/bench_step_cost.py: LD's step 6.7 -> 5.1 s at 1 thread)
                    module.padding_mode = "constant"

    def config(self) -> dict:
        """Constructor arguments (JSON-able), for the encoder-cache manifest."""
        config = {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "features": list(self.features),
            "embedding_dim": self.embedding_dim,
            "num_clusters": self.num_clusters,
        }
        if self.padding_mode != "zeros":  # absent in older manifests, where it means zeros
            config["padding_mode"] = self.padding_mode
        return config

    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputError unless ``x`` is ``B, in_channels, *spatial`` with sizes divisible by 16."""
        if x.ndim != self.spatial_dims + 2:
            raise InputError(
                f"LDNet input: expected a {self.spatial_dims + 2}-D tensor B,C,{'H,W' if self.spatial_dims == 2 else 'D,H,W'}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise InputError(f"LDNet input: expected {self.in_channels} channel(s), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(s % SIZE_DIVISOR or s == 0 for s in spatial):
            raise InputError(
                f"LDNet input: every spatial size must be a positive multiple of {SIZE_DIVISOR} "
                f"(four 2x poolings), got {spatial}; crop or pad the input first"
            )

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm per-voxel embedding ``B, D, *spatial`` of ``x`` (``B, C, *spatial``)."""
        h = self.embedding_head(self._trunk(x)).float()
        return h / (h.norm(dim=1, keepdim=True) + _EPS)

    def forward(self, x: torch.Tensor) -> LDOutput:
        """``x``: ``B, C, *spatial`` (sizes divisible by 16) -> :class:`LDOutput`."""
        trunk = self._trunk(x)
        # normalisations in float32 (under CUDA autocast the heads give float16)
        h = self.embedding_head(trunk).float()
        embedding = h / (h.norm(dim=1, keepdim=True) + _EPS)
        a = torch.sigmoid(self.cluster_head(trunk).float()) + _EPS
        assignment = a / a.sum(dim=1, keepdim=True)
        return LDOutput(embedding=embedding, assignment=assignment)
