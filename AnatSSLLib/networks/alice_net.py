"""Alice network: MONAI's SwinUNETR as the masked encoder-decoder of Alice (student and teacher).

Jiang et al., "Anatomical invariance modeling and semantic alignment for self-supervised learning
in 3D medical image analysis" (Alice), ICCV 2023 (arXiv 2302.05615); reference code
``alibaba-damo-academy/alice`` @ d45cfcd (Apache-2.0), ``models/nnFormer.py``. Our own code,
written from METHODS.md section 4.2.

Relation to the paper's network (an nnFormer at 64^3, dim 48):

- Backbone: :class:`monai.networks.nets.SwinUNETR` (patch 2, four Swin stages, a UNETR-style
  convolutional decoder), kept *whole* under the attribute ``unetr`` so that its weights load
  straight into a SwinUNETR for fine-tuning (:func:`swinunetr_state_from_alice`,
  :func:`init_swinunetr_from_encoder`). Its 1-channel output block is the reconstruction head.
- Token maps, chosen to match Alice's resolutions and widths: at a 64^3 input with
  ``feature_size=48``, Alice's encoder tokens are 64 x 384 (4^3) and its first-decoder-stage tokens
  512 x 192 (8^3). Here ``enc_tokens`` = the Swin stage-3 output (``8*feature_size`` channels at
  1/16 of the input; 64 x 384 at 64^3, fs 48) and ``dec_tokens`` = the decoder stage at 1/8
  (``decoder4``, ``4*feature_size`` channels; 512 x 192). ``cls`` = the average pool of the deepest
  Swin output (``16*feature_size`` channels at 1/32), the global bottleneck of SwinUNETR.
- Masking (SimMIM, as Alice): masked voxels are zeroed (this also feeds the convolutional skip
  path) and, after the patch embedding, the masked patch tokens are replaced by a learnable
  ``mask_token`` (a token is masked when any of its 2^3 voxels is).
- :meth:`AliceNet.embed`: the dense, unit-norm features the landmark and search tools use (the
  same interface as :meth:`~AnatSSLLib.networks.LDNet.embed`). Per voxel at input resolution:
  the decoder stage at 1/8 (``dec_tokens``' map, upsampled trilinearly) and the last decoder stage
  (full resolution), each layer-normalised over channels, concatenated, projected by a *fixed*
  1x1 semi-orthogonal matrix (a buffer drawn from ``embed_seed``, saved with the weights) to
  ``embedding_dim`` and L2-normalised. Nothing trains that projection: what makes it meaningful is
  what Alice trains in the features it projects (the 1/8 stage by the patch/CAFA objective and
  the reconstruction, the last stage by the reconstruction). A random orthogonal projection keeps
  inner products up to a small distortion, so cosine matching in ``embed`` space follows cosine
  matching in the decoder-feature space.

Input sizes: every spatial size must be a multiple of 32 for :meth:`AliceNet.forward` (five 2x
reductions); :meth:`AliceNet.embed` zero-pads to a multiple of 32 and crops back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from ..errors import InputError

__all__ = [
    "AliceNet",
    "AliceOutput",
    "SIZE_DIVISOR",
    "build_alice_net",
    "swinunetr_kwargs",
    "resolve_norm",
    "make_swinunetr",
    "swinunetr_state_from_alice",
    "init_swinunetr_from_encoder",
]

SIZE_DIVISOR = 32
_EPS = 1e-10


class AliceOutput(NamedTuple):
    """What :meth:`AliceNet.forward` returns (B = batch, S = input spatial size, fs = feature_size).

    - ``cls``: ``B, 16*fs``, average pool of the bottleneck (Swin stage 4, 1/32 resolution).
    - ``enc_tokens``: ``B, (S/16)^3, 8*fs``, Swin stage-3 tokens (layer-normalised).
    - ``dec_tokens``: ``B, (S/8)^3, 4*fs``, decoder tokens at 1/8 resolution.
    - ``reconstruction``: ``B, in_channels, *S``, the generative (MIM) output.
    """

    cls: Tensor
    enc_tokens: Tensor
    dec_tokens: Tensor
    reconstruction: Tensor


def swinunetr_kwargs(
    in_channels: int = 1,
    feature_size: int = 12,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 4,
    out_channels: int | None = None,
    norm_name: str | Sequence[Any] = "instance",
) -> dict[str, Any]:
    """Keyword arguments of the :class:`SwinUNETR` whose weights an :class:`AliceNet` shares.

    ``out_channels`` defaults to ``in_channels`` (the reconstruction head); give the number of
    classes for a segmentation network to fine-tune.
    """
    return {
        "in_channels": int(in_channels),
        "out_channels": int(in_channels if out_channels is None else out_channels),
        "patch_size": 2,
        "depths": tuple(int(d) for d in depths),
        "num_heads": tuple(int(h) for h in num_heads),
        "window_size": int(window_size),
        "feature_size": int(feature_size),
        "norm_name": _norm_arg(norm_name),
        "normalize": True,
        "use_v2": False,
        "spatial_dims": 3,
    }


def _norm_arg(norm_name: str | Sequence[Any]) -> str | tuple:
    """MONAI's ``norm_name`` from a JSON-able value (a list ``["group", {...}]`` becomes a tuple)."""
    if isinstance(norm_name, str):
        return norm_name
    return tuple(norm_name)


def resolve_norm(norm_name: str | Sequence[Any], img_size: int) -> str | list:
    """``"auto"`` -> ``"instance"`` for crops of 64^3 and more, else ``["group", {"num_groups": 4}]``.

    SwinUNETR's bottleneck is 1/32 of the input: at 32^3 it is a single voxel, where instance
    norm is undefined in training; group norm (4 groups, dividing every SwinUNETR width) is not.
    """
    if isinstance(norm_name, str) and norm_name == "auto":
        return "instance" if int(img_size) >= 64 else ["group", {"num_groups": 4}]
    return norm_name if isinstance(norm_name, str) else [norm_name[0], dict(norm_name[1])] if len(norm_name) > 1 else [norm_name[0]]


class AliceNet(nn.Module):
    """Alice's encoder-decoder on SwinUNETR, with SimMIM masking and a dense embedding.

    Args:
        img_size: training crop size (voxels per axis, a multiple of 32: 32 for the CPU scale-down,
            64 as the paper). Only recorded (SwinUNETR itself accepts any multiple of 32).
        in_channels: image channels (1).
        feature_size: SwinUNETR width ``fs`` (12 or 24 on CPU; 48 as Alice's nnFormer dim).
            Must be divisible by 12 (SwinUNETR's requirement).
        depths, num_heads: Swin blocks and attention heads per stage (SwinUNETR defaults).
        window_size: Swin window (voxels per axis at every stage); 4 divides the token grids of
            32^3 and 64^3 crops. A SwinUNETR to fine-tune must use the same value.
        embedding_dim: channels of :meth:`embed` (32, as LD's embedding).
        embed_seed: seed of the fixed projection of :meth:`embed`.
        norm_name: SwinUNETR's convolutional-block norm; ``"auto"`` (default) is ``"instance"``
            (SwinUNETR's default) for ``img_size >= 64`` and 4-group norm below (see
            :func:`resolve_norm`). A SwinUNETR to fine-tune must use the same (``make_swinunetr``).

    Raises:
        InputError: a size or width SwinUNETR cannot build.
    """

    size_divisor = SIZE_DIVISOR

    def __init__(
        self,
        img_size: int = 32,
        in_channels: int = 1,
        feature_size: int = 12,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 4,
        embedding_dim: int = 32,
        embed_seed: int = 0,
        norm_name: str | Sequence[Any] = "auto",
    ) -> None:
        super().__init__()
        if int(img_size) < SIZE_DIVISOR or int(img_size) % SIZE_DIVISOR:
            raise InputError(f"AliceNet img_size: expected a positive multiple of {SIZE_DIVISOR}, got {img_size!r}")
        if int(feature_size) < 12 or int(feature_size) % 12:
            raise InputError(f"AliceNet feature_size: expected a multiple of 12 (SwinUNETR), got {feature_size!r}")
        if len(depths) != 4 or len(num_heads) != 4:
            raise InputError(
                f"AliceNet depths/num_heads: expected 4 stages each, got depths={tuple(depths)}, "
                f"num_heads={tuple(num_heads)}"
            )
        if int(embedding_dim) < 1:
            raise InputError(f"AliceNet embedding_dim: expected a positive integer, got {embedding_dim!r}")
        self.img_size = int(img_size)
        self.in_channels = int(in_channels)
        self.feature_size = int(feature_size)
        self.depths = tuple(int(d) for d in depths)
        self.num_heads = tuple(int(h) for h in num_heads)
        self.window_size = int(window_size)
        self.embedding_dim = int(embedding_dim)
        self.embed_seed = int(embed_seed)
        self.norm_name = resolve_norm(norm_name, self.img_size)

        self.unetr = SwinUNETR(**swinunetr_kwargs(
            self.in_channels, self.feature_size, self.depths, self.num_heads, self.window_size,
            norm_name=self.norm_name,
        ))
        fs = self.feature_size
        self.mask_token = nn.Parameter(torch.zeros(fs))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # Fixed semi-orthogonal 1x1 projection of [dec(1/8), dec(1)] -> embedding_dim.
        width = 5 * fs
        gen = torch.Generator().manual_seed(self.embed_seed)
        a = torch.randn(max(width, self.embedding_dim), min(width, self.embedding_dim), generator=gen)
        q, _ = torch.linalg.qr(a)  # orthonormal columns
        proj = q.T if width >= self.embedding_dim else q  # (embedding_dim, width)
        self.register_buffer("embed_proj", proj.contiguous())

    # ------------------------------------------------------------------------------ bookkeeping
    @property
    def channels(self) -> dict[str, int]:
        """Channel widths of the outputs: ``cls``, ``enc``, ``dec``."""
        fs = self.feature_size
        return {"cls": 16 * fs, "enc": 8 * fs, "dec": 4 * fs}

    def config(self) -> dict:
        """Constructor arguments (JSON-able), for the encoder-cache manifest."""
        return {
            "img_size": self.img_size,
            "in_channels": self.in_channels,
            "feature_size": self.feature_size,
            "depths": list(self.depths),
            "num_heads": list(self.num_heads),
            "window_size": self.window_size,
            "embedding_dim": self.embedding_dim,
            "embed_seed": self.embed_seed,
            "norm_name": self.norm_name,
        }

    def check_input(self, x: Tensor) -> None:
        """Raise InputError unless ``x`` is ``B, in_channels, D, H, W`` with sizes multiples of 32."""
        if x.ndim != 5:
            raise InputError(f"AliceNet input: expected a 5-D tensor B,C,D,H,W, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise InputError(f"AliceNet input: expected {self.in_channels} channel(s), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(s % SIZE_DIVISOR or s == 0 for s in spatial):
            raise InputError(
                f"AliceNet input: every spatial size must be a positive multiple of {SIZE_DIVISOR} "
                f"(patch 2 and four 2x merges), got {spatial}; crop or pad the input first"
            )

    def _mask_as_input(self, x: Tensor, mask: Tensor) -> Tensor:
        if mask.ndim == 4:
            mask = mask.unsqueeze(1)
        if mask.ndim != 5 or mask.shape[0] != x.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:]:
            raise InputError(
                f"AliceNet mask: expected shape B,1,D,H,W or B,D,H,W matching the input {tuple(x.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        return mask.to(dtype=x.dtype)

    # ------------------------------------------------------------------------------ the network
    def _trunk(self, x: Tensor, mask: Tensor | None) -> tuple[list[Tensor], Tensor, Tensor]:
        """Swin hidden states, the 1/8 decoder map and the last decoder map of (masked) ``x``."""
        u = self.unetr
        vit = u.swinViT
        if mask is not None:
            x = x * (1.0 - mask)
        x0 = vit.patch_embed(x)  # B, fs, S/2
        if mask is not None:
            w = F.max_pool3d(mask, kernel_size=2, stride=2)  # token masked if any voxel is
            x0 = x0 * (1.0 - w) + self.mask_token.view(1, -1, 1, 1, 1).to(x0.dtype) * w
        x0 = vit.pos_drop(x0)
        hs = [vit.proj_out(x0, u.normalize)]
        h = x0
        for layers in (vit.layers1, vit.layers2, vit.layers3, vit.layers4):
            h = layers[0](h.contiguous())
            hs.append(vit.proj_out(h, u.normalize))
        enc0 = u.encoder1(x)
        enc1 = u.encoder2(hs[0])
        enc2 = u.encoder3(hs[1])
        enc3 = u.encoder4(hs[2])
        dec4 = u.encoder10(hs[4])
        dec3 = u.decoder5(dec4, hs[3])
        dec2 = u.decoder4(dec3, enc3)
        dec1 = u.decoder3(dec2, enc2)
        dec0 = u.decoder2(dec1, enc1)
        last = u.decoder1(dec0, enc0)
        return hs, dec2, last

    def forward(self, x: Tensor, mask: Tensor | None = None) -> AliceOutput:
        """``x``: ``B, C, D, H, W`` (multiples of 32); ``mask``: ``B, 1, D, H, W`` or ``B, D, H, W``
        (1 = masked voxel) or None -> :class:`AliceOutput`."""
        self.check_input(x)
        m = self._mask_as_input(x, mask) if mask is not None else None
        hs, dec2, last = self._trunk(x, m)
        cls = hs[4].mean(dim=(2, 3, 4))
        enc_tokens = hs[3].flatten(2).transpose(1, 2)
        dec_tokens = dec2.flatten(2).transpose(1, 2)
        reconstruction = self.unetr.out(last)
        return AliceOutput(cls=cls, enc_tokens=enc_tokens, dec_tokens=dec_tokens, reconstruction=reconstruction)

    def embed(self, x: Tensor) -> Tensor:
        """Unit-norm per-voxel embedding ``B, embedding_dim, D, H, W`` of ``x`` (``B, C, D, H, W``, any size).

        The input is zero-padded to a multiple of 32 and the result cropped back (see the module
        docstring for what the embedding is).
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise InputError(
                f"AliceNet.embed input: expected B,{self.in_channels},D,H,W, got shape {tuple(x.shape)}"
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        pad = [(-s) % SIZE_DIVISOR for s in spatial]
        if any(pad):
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
        _, dec2, last = self._trunk(x, None)
        up = F.interpolate(dec2, size=last.shape[2:], mode="trilinear", align_corners=False)
        feats = torch.cat([_channel_layer_norm(up), _channel_layer_norm(last)], dim=1)
        h = torch.einsum("dc,bc...->bd...", self.embed_proj.to(feats.dtype), feats)
        h = h[:, :, : spatial[0], : spatial[1], : spatial[2]]
        return h / (h.norm(dim=1, keepdim=True) + _EPS)


def _channel_layer_norm(x: Tensor) -> Tensor:
    """Layer norm over the channels of ``B, C, *S`` (no affine)."""
    mu = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + 1e-5)


def build_alice_net(**params: Any) -> AliceNet:
    """Registry factory: ``AliceNet(**params)`` (``params`` as :meth:`AliceNet.config` gives them)."""
    return AliceNet(**params)


# ------------------------------------------------------------------------------ SwinUNETR transfer


def _alice_net_state(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The AliceNet part of ``state``: an AliceNet state dict, or an AliceModel one (``student.``/``teacher.``)."""
    if any(k.startswith("unetr.") for k in state):
        return dict(state)
    prefix = f"{source}."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not any(k.startswith("unetr.") for k in sub):
        raise InputError(
            f"Alice state: expected AliceNet keys 'unetr.*' or AliceModel keys '{prefix}unetr.*', "
            f"got keys like {sorted(state)[:3]}"
        )
    return sub


def swinunetr_state_from_alice(
    state: Mapping[str, Tensor], source: str = "teacher", include_head: bool = False
) -> dict[str, Tensor]:
    """SwinUNETR state-dict entries from an Alice state (AliceNet's, or AliceModel's ``source`` net).

    Args:
        state: an :class:`AliceNet` state dict (keys ``unetr.*``), e.g. a cached Alice encoder,
            or an ``AliceModel`` state dict (keys ``student.unetr.*`` / ``teacher.unetr.*``).
        source: ``"teacher"`` (default; the EMA network) or ``"student"`` for an AliceModel state.
        include_head: also return the 1-channel output block ``out.*`` (the reconstruction head;
            off by default since a segmentation network has its own classes).

    Returns:
        ``{swinunetr_key: tensor}`` for ``swinViT.*``, ``encoder*``, ``decoder*`` (and ``out.*``).
    """
    if source not in ("teacher", "student"):
        raise InputError(f"swinunetr_state_from_alice source: expected 'teacher' or 'student', got {source!r}")
    net = _alice_net_state(state, source)
    out = {k[len("unetr."):]: v for k, v in net.items() if k.startswith("unetr.")}
    if not include_head:
        out = {k: v for k, v in out.items() if not k.startswith("out.")}
    return out


def make_swinunetr(alice_params: Mapping[str, Any], out_channels: int) -> SwinUNETR:
    """A fresh :class:`SwinUNETR` with the architecture of ``alice_params`` (AliceNet.config())."""
    p = dict(alice_params)
    return SwinUNETR(**swinunetr_kwargs(
        p.get("in_channels", 1), p.get("feature_size", 12), p.get("depths", (2, 2, 2, 2)),
        p.get("num_heads", (3, 6, 12, 24)), p.get("window_size", 4), out_channels=out_channels,
        norm_name=resolve_norm(p.get("norm_name", "auto"), p.get("img_size", 32)),
    ))


def init_swinunetr_from_encoder(
    swinunetr: SwinUNETR, alice_state: Mapping[str, Tensor], source: str = "teacher"
) -> list[str]:
    """Load Alice weights into ``swinunetr`` (in place) for fine-tuning; return the keys loaded.

    Everything but the output block transfers (Swin encoder, convolutional encoders, decoder);
    the output block keeps its initialisation (its class count differs).

    Raises:
        InputError: a weight whose shape differs (another feature_size, window_size, depth or
            head count): build the SwinUNETR with :func:`make_swinunetr` from the encoder's params.
    """
    incoming = swinunetr_state_from_alice(alice_state, source=source, include_head=False)
    own = swinunetr.state_dict()
    unknown = sorted(k for k in incoming if k not in own)
    bad = sorted(k for k in incoming if k in own and tuple(own[k].shape) != tuple(incoming[k].shape))
    if unknown or bad:
        shown = ", ".join(f"{k}: {tuple(incoming[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:3])
        raise InputError(
            f"init_swinunetr_from_encoder: the Alice weights do not fit this SwinUNETR "
            f"({len(bad)} shape mismatch(es){': ' + shown if shown else ''}; {len(unknown)} unknown key(s)"
            f"{': ' + ', '.join(unknown[:3]) if unknown else ''}); build it with make_swinunetr(encoder params)"
        )
    swinunetr.load_state_dict(incoming, strict=False)
    return sorted(incoming)
