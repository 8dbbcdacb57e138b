"""Segmentation networks built from a pretrained encoder's architecture, for fine-tuning.

A cached 3D encoder names its architecture in its manifest; :func:`build_segmenter` builds the
segmentation network that architecture's weights fit, and :func:`init_segmenter_from_encoder`
copies those weights in:

- ``alice_swin3d`` -> MONAI :class:`~monai.networks.nets.SwinUNETR` with the encoder's sizes
  (Alice's backbone *is* a SwinUNETR: everything but the output block transfers, see
  :func:`~AnatSSLLib.networks.alice_net.init_swinunetr_from_encoder`).
- ``ld_unet3d`` -> :class:`LDSegmenter`: LD's U-Net trunk (MONAI BasicUNet) with a 1x1x1
  convolution to the classes in place of LD's embedding and cluster heads; the trunk transfers.

Both give logits ``B, num_classes, *S``. The same builder with no weights loaded is the
random-initialisation baseline of the fine-tuning benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..errors import InputError
from .ld_net import LDNet

__all__ = ["LDSegmenter", "SEGMENTER_ARCHITECTURES", "build_segmenter", "init_segmenter_from_encoder", "size_divisor"]

SEGMENTER_ARCHITECTURES = ("alice_swin3d", "ld_unet3d")


class LDSegmenter(nn.Module):
    """LD's 3D U-Net trunk with a per-voxel linear classifier.

    Args:
        num_classes: output channels (background included).
        ld_params: the LD encoder's constructor arguments (``LDNet.config()``).

    Input ``B, C, D, H, W`` (sizes divisible by 16) -> logits ``B, num_classes, D, H, W``.
    """

    def __init__(self, num_classes: int, ld_params: Mapping[str, Any]) -> None:
        super().__init__()
        net = LDNet(**{**dict(ld_params), "spatial_dims": 3})
        self.trunk = net  # keeps LDNet's input checks; its two heads are left unused
        self.classifier = nn.Conv3d(net.features[5], int(num_classes), kernel_size=1)
        # the heads are not part of the segmenter: drop them so they take no optimiser state
        del net.embedding_head, net.cluster_head

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.trunk._trunk(x))


def size_divisor(architecture: str) -> int:
    """The multiple every input size must be for ``architecture`` (32 for SwinUNETR, 16 for LD)."""
    _check_architecture(architecture)
    return 32 if architecture == "alice_swin3d" else 16


def _check_architecture(architecture: str) -> None:
    if architecture not in SEGMENTER_ARCHITECTURES:
        raise InputError(
            f"fine-tuning: an encoder of architecture {architecture!r} cannot initialise a segmentation "
            f"network; use a 3D Alice or LD encoder ({', '.join(SEGMENTER_ARCHITECTURES)})"
        )


def build_segmenter(architecture: str, params: Mapping[str, Any], num_classes: int) -> nn.Module:
    """A freshly initialised segmentation network for an encoder ``architecture`` with ``params``.

    Raises:
        InputError: an architecture that no segmentation network fits (2D, AWCL), fewer than 2 classes.
    """
    _check_architecture(architecture)
    if int(num_classes) < 2:
        raise InputError(f"fine-tuning: expected at least 2 classes (background and one structure), got {num_classes}")
    if architecture == "alice_swin3d":
        from .alice_net import make_swinunetr

        return make_swinunetr(params, out_channels=int(num_classes))
    return LDSegmenter(int(num_classes), params)


def init_segmenter_from_encoder(segmenter: nn.Module, architecture: str, encoder_state: Mapping[str, Tensor]) -> list[str]:
    """Copy a cached encoder's weights into ``segmenter`` (in place); return the keys loaded.

    Raises:
        InputError: weights that do not fit (another size of the same architecture).
    """
    _check_architecture(architecture)
    if architecture == "alice_swin3d":
        from .alice_net import init_swinunetr_from_encoder

        return init_swinunetr_from_encoder(segmenter, encoder_state)
    own = segmenter.trunk.state_dict()
    incoming = {k: v for k, v in encoder_state.items() if k.startswith("backbone.")}
    bad = sorted(k for k, v in incoming.items() if k not in own or tuple(own[k].shape) != tuple(v.shape))
    if bad or not incoming:
        raise InputError(
            f"fine-tuning: the LD encoder's weights do not fit this network ({len(bad)} mismatching key(s), "
            f"e.g. {bad[:3]}); build it from the encoder's own params"
        )
    segmenter.trunk.load_state_dict(incoming, strict=False)
    return sorted(incoming)
