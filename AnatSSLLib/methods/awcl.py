"""AWCL: anatomy-aware contrastive learning for 2D images (Fu et al., ECCV-W 2022).

Adapted from: the paper (arXiv 2208.10642) and its reference code ``JianboJiao/AWCL`` @ 7e92fe6
(BSD-2), as summarised in METHODS.md §1. This file holds the method's augmentation, pair sampler,
loss and training task; the network is :class:`~AnatSSLLib.networks.awcl_net.AWCLNet` and the data
interface :mod:`.awcl_data`.

**Loss (the paper's rule, applied per anchor).** ``N`` sampled images give ``2N`` views ``z``
(``z[:N]`` first views, ``z[N:]`` second views; ``j(i) = (i + N) mod 2N``), ``O(i)`` all views but
``i``, ``A(i) = {k in O(i): tag_k = tag_i}``:

- untagged anchor: ``L_c = -log( exp(z_i.z_j(i)/tau) / sum_{a in O(i)} exp(z_i.z_a/tau) )``;
- tagged anchor: ``L_A = -(1/|A(i)|) sum_{p in A(i)} log( exp(z_i.z_p/tau) / sum_{a in O(i)} ... )``;
- ``L = (tau / base_tau) * mean_i L^i`` with ``tau = 0.5`` and ``base_tau = 0.07`` (SupCon's
  constant, kept as in the reference; ``base_tau=None`` drops it).

Untagged views get a unique pseudo-tag shared only by the two views of their pair, so
``A(i) = {j(i)}`` and ``L_A = L_c``: one formula covers both cases. The reference code applies the
rule of *sample 0* to the whole batch (if sample 0 is untagged all tags are ignored, otherwise all
untagged samples become mutual positives); this implementation does **not** reproduce that: the
rule is applied per anchor, as in the paper's figure (a recorded deviation from the code).

**Sampling: what is the paper's and what is ours.** Paper/code: both views of a sample come from
one frame; each tagged sample keeps its tag with probability ``r`` (the *anatomy ratio*, paper
Sec. 6.4; otherwise the tag is set to -1, untagged), so cross-image positives arise only between
same-tag images that happen to share a batch; tagged and untagged images are drawn in proportion
to their numbers. **Ours** (issue 6, :class:`AnatomyAwarePairSampler`): anchors are drawn
uniformly from all images (tagged and untagged together, as in the paper); a tagged anchor keeps
its tag with probability ``r`` exactly as in the paper, and when it does, its second view is an
augmented view of *another* image with the same tag (from the same or another scan, uniformly)
when one exists, instead of a second view of itself; otherwise (untagged, tag dropped, or a tag
held by that image only) the second view is an augmented view of the anchor. Hence every batch
carries same-anatomy cross-image positives even at small batch sizes, with ``r`` the probability
that an anchor's positive is another image; in-batch same-tag views remain positives (SupCon
style, the paper's ``A(i)``); all other views are negatives (the paper's in-batch negatives, no
memory bank). ``r = 0`` is SimCLR.

**Augmentation (adapted to grey MRI/ultrasound).** The reference turns grey frames into 3
channels and uses torchvision's RandomResizedCrop(227), horizontal flip, ColorJitter(0.4, 0.4,
0.4, 0.1) with p 0.8, grayscale p 0.2 and ImageNet normalisation. On one grey channel saturation,
hue and grayscale do not exist and ImageNet statistics do not apply, so :func:`augment_views` does:
random resized crop (area ``crop_scale``, aspect ``crop_ratio``, bilinear) to the input size,
horizontal flip p 0.5, and with probability ``jitter_p`` brightness (additive, ±``brightness``/2)
and contrast (multiplicative about the image mean, 1 ± ``contrast``) jitter followed by a gamma in
[0.75, 1.25] (the reference's gamma/brightness jitter of labelled frames), values clipped to
[0, 1]. The default crop area (0.3, 1.0) is narrower than torchvision's (0.08, 1.0) because the
images here are 64-96 px instead of 227 px.

**Forward pass.** The reference runs the network once per view set (two BatchNorm batches); here
both view sets go through one forward call (one BatchNorm batch of 2N), which DDP requires (one
forward per backward). With ``norm="instance"`` or group norm the two are identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .awcl_data import Granularity, TaggedImageSet

__all__ = [
    "AWCLTask",
    "AnatomyAwarePairSampler",
    "PairBatch",
    "augment_views",
    "awcl_loss",
    "awcl_positive_mask",
]

UNTAGGED = -1


# ---------------------------------------------------------------------------------- augmentation


def _uniform(generator: torch.Generator | None, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def augment_views(
    images: Tensor,
    generator: torch.Generator | None = None,
    *,
    crop_scale: tuple[float, float] = (0.3, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    jitter_p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    gamma: tuple[float, float] = (0.75, 1.25),
) -> Tensor:
    """One random SimCLR-style view of each image (grey adaptation, see the module docstring).

    Args:
        images: ``(B, C, H, W)`` float in [0, 1].
        generator: the source of every random draw (the same generator state gives the same views).
        crop_scale: range of the crop area as a fraction of the image.
        crop_ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of the intensity jitter (brightness, contrast, gamma).
        brightness, contrast: jitter strengths; gamma: range of the gamma exponent.

    Returns:
        ``(B, C, H, W)`` float32 in [0, 1].
    """
    if images.ndim != 4:
        raise InputError(f"augment_views images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    b = images.shape[0]
    x = images.float()
    # random resized crop as an affine resampling: output [-1, 1]^2 -> crop box in input coords
    area = _uniform(generator, b, *crop_scale)
    log_r = _uniform(generator, b, math.log(crop_ratio[0]), math.log(crop_ratio[1]))
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of the width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(b, generator=generator) - 1)  # centre in [-1+w, 1-w]
    cy = (1 - h) * (2 * torch.rand(b, generator=generator) - 1)
    flip = torch.rand(b, generator=generator) < flip_p
    sx = torch.where(flip, -w, w)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # intensity jitter
    apply = (torch.rand(b, generator=generator) < jitter_p).float().view(b, 1, 1, 1).to(x.device)
    add = _uniform(generator, b, -brightness / 2, brightness / 2).view(b, 1, 1, 1).to(x.device)
    mul = _uniform(generator, b, 1 - contrast, 1 + contrast).view(b, 1, 1, 1).to(x.device)
    gam = _uniform(generator, b, *gamma).view(b, 1, 1, 1).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    j = ((x - mean) * mul + mean + add).clamp(0.0, 1.0) ** gam
    x = apply * j + (1 - apply) * x
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------- sampler


class PairBatch(dict):
    """A sampled batch of pairs: ``anchor``, ``partner`` (N int64 image indices), ``kept``
    (N bool: the anchor's tag was kept), ``tags`` (N int64 tag ids, -1 = untagged or dropped)."""


class AnatomyAwarePairSampler:
    """Anchors and their positive partners for AWCL (rule in the module docstring, "ours").

    Args:
        tags: one tag (str, int or None = untagged) per image at the chosen granularity, or a
            mapping ``{"coarse": [...], "fine": [...]}`` from which ``granularity`` picks, or a
            :class:`~.awcl_data.TaggedImageSet`.
        scan_ids: one scan id per image (recorded; the partner may come from any scan).
        ratio: the anatomy ratio ``r`` in [0, 1].
        granularity: ``"coarse"`` or ``"fine"`` (used when ``tags`` holds both).
        rng: default random source for :meth:`sample` (a ``torch.Generator``, an int seed, or None).

    Attributes:
        tag_names: the sorted distinct tags; tag ids index into it.
        tag_ids: ``(M,)`` int64, -1 for untagged images.
    """

    def __init__(
        self,
        tags: Sequence[Any] | Mapping[str, Sequence[Any]] | TaggedImageSet,
        scan_ids: Sequence[Any] | None = None,
        ratio: float = 0.5,
        granularity: str = "fine",
        rng: torch.Generator | int | None = None,
    ) -> None:
        self.granularity = Granularity.check(granularity)
        if isinstance(tags, TaggedImageSet):
            scan_ids = tags.scan_ids if scan_ids is None else scan_ids
            tags = tags.tags(self.granularity)
        elif isinstance(tags, Mapping):
            if self.granularity not in tags:
                raise InputError(f"tags: expected a '{self.granularity}' entry, got keys {sorted(tags)}")
            tags = tags[self.granularity]
        tags = list(tags)
        if not tags:
            raise InputError("AnatomyAwarePairSampler tags: expected at least one image, got none")
        if scan_ids is None:
            scan_ids = list(range(len(tags)))
        if len(scan_ids) != len(tags):
            raise InputError(f"scan_ids: expected {len(tags)} entries (one per tag), got {len(scan_ids)}")
        if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise InputError(f"anatomy ratio: expected a number in [0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self.scan_ids = list(scan_ids)
        clean = [None if (t is None or (isinstance(t, (int, np.integer)) and t < 0)) else str(t) for t in tags]
        self.tag_names = sorted({t for t in clean if t is not None})
        index = {t: k for k, t in enumerate(self.tag_names)}
        self.tag_ids = torch.tensor([UNTAGGED if t is None else index[t] for t in clean], dtype=torch.int64)
        # members[k]: images with tag k; position of each image within its tag's member list
        self._members = [torch.nonzero(self.tag_ids == k).flatten() for k in range(len(self.tag_names))]
        self._sizes = torch.tensor([len(m) for m in self._members] + [0], dtype=torch.int64)
        self._pos = torch.zeros(len(clean), dtype=torch.int64)
        for m in self._members:
            self._pos[m] = torch.arange(len(m))
        if isinstance(rng, int):
            rng = torch.Generator().manual_seed(rng)
        self.rng = rng

    def __len__(self) -> int:
        return len(self.tag_ids)

    def sample(self, n: int, generator: torch.Generator | None = None) -> PairBatch:
        """Draw ``n`` anchors (without replacement while ``n <= len(self)``) and their partners.

        For each anchor: with probability ``ratio`` a tagged anchor keeps its tag (``kept``); a kept
        anchor whose tag has other images gets one of them (uniformly) as partner, else the anchor
        itself. Dropped or untagged anchors have ``partner == anchor`` and tag -1.
        """
        g = generator if generator is not None else self.rng
        m = len(self)
        n = int(n)
        if n < 1:
            raise InputError(f"sample: expected n >= 1, got {n}")
        if n <= m:
            anchor = torch.randperm(m, generator=g)[:n]
        else:
            anchor = torch.randint(m, (n,), generator=g)
        u = torch.rand(n, generator=g)
        pick = torch.rand(n, generator=g)
        tag = self.tag_ids[anchor]
        kept = (tag >= 0) & (u < self.ratio)
        size = self._sizes[tag]  # tag -1 indexes the trailing 0
        can = kept & (size > 1)
        partner = anchor.clone()
        if bool(can.any()):
            # a uniform other member: position in [0, size-1), skipping the anchor's own position
            k = torch.clamp((pick[can] * (size[can] - 1)).long(), max=size[can] - 2)
            own = self._pos[anchor[can]]
            k = k + (k >= own).long()
            partner[can] = torch.stack([self._members[int(t)][int(q)] for t, q in zip(tag[can], k)])
        tags_out = torch.where(kept, tag, torch.full_like(tag, UNTAGGED))
        return PairBatch(anchor=anchor, partner=partner, kept=kept, tags=tags_out)


# ------------------------------------------------------------------------------------------ loss


def awcl_positive_mask(tags: Tensor) -> Tensor:
    """``(2N, 2N)`` bool: ``mask[i, k]`` is ``k in A(i)`` (same tag, ``k != i``).

    ``tags``: ``(2N,)`` int, views ``i`` and ``i + N`` form a pair; negative = untagged, replaced
    by a pseudo-tag unique to the pair (so an untagged anchor's only positive is its other view).
    """
    tags = torch.as_tensor(tags).long().flatten()
    two_n = tags.numel()
    if two_n % 2 or two_n < 2:
        raise InputError(f"awcl tags: expected 2N entries (two views per sample), got {two_n}")
    n = two_n // 2
    pair = torch.arange(two_n, device=tags.device) % n
    top = int(tags.max().clamp(min=-1)) + 1
    eff = torch.where(tags >= 0, tags, top + pair)
    mask = eff[:, None] == eff[None, :]
    mask.fill_diagonal_(False)
    return mask


def awcl_loss(
    z: Tensor,
    tags: Tensor | Sequence[int],
    tau: float = 0.5,
    base_tau: float | None = 0.07,
    reduction: str = "mean",
) -> Tensor:
    """AWCL's contrastive loss, per-anchor L_c / L_A rule (module docstring), in-batch negatives.

    Args:
        z: ``(2N, D)`` projections, first views then second views (L2-normalised here).
        tags: ``(2N,)`` int tag ids; negative = untagged. Views ``i`` and ``i+N`` of a pair must
            carry the same tag for the pair to be positive (as :class:`AWCLTask` builds them).
        tau: temperature (paper 0.5).
        base_tau: SupCon's base temperature; the loss is scaled by ``tau / base_tau`` (0.5/0.07
            = 7.14, the reference's constant). None: no scaling.
        reduction: ``"mean"`` (over the 2N anchors) or ``"none"`` (``(2N,)`` per-anchor losses).

    Returns:
        scalar, or ``(2N,)`` with ``reduction="none"``.
    """
    if z.ndim != 2:
        raise InputError(f"awcl_loss z: expected (2N, D), got shape {tuple(z.shape)}")
    tags = torch.as_tensor(tags, device=z.device).long().flatten()
    if tags.numel() != z.shape[0]:
        raise InputError(f"awcl_loss tags: expected {z.shape[0]} entries (one per row of z), got {tags.numel()}")
    if not tau > 0:
        raise InputError(f"awcl_loss tau: expected a positive temperature, got {tau}")
    if reduction not in ("mean", "none"):
        raise InputError(f"awcl_loss reduction: expected 'mean' or 'none', got {reduction!r}")
    pos = awcl_positive_mask(tags)
    zn = F.normalize(z.float(), dim=1)
    logits = zn @ zn.t() / tau
    eye = torch.eye(len(zn), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))  # O(i) excludes i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(eye, 0.0)
    per_anchor = -(log_prob * pos).sum(dim=1) / pos.sum(dim=1)
    if base_tau is not None:
        per_anchor = per_anchor * (tau / float(base_tau))
    return per_anchor.mean() if reduction == "mean" else per_anchor


# ------------------------------------------------------------------------------------------ task


def _gather_cat(x: Tensor, differentiable: bool) -> Tensor:
    import torch.distributed as dist

    if differentiable:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(list(all_gather(x)), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class AWCLTask:
    """AWCL as a task for :func:`AnatSSLLib.engine.train`.

    One sample is an (anchor, partner) pair from :class:`AnatomyAwarePairSampler`: two augmented
    views (:func:`augment_views`) and the pair's tag id (-1 if untagged or dropped). ``loss`` runs
    the network on both views and :func:`awcl_loss`. Under ``torchrun`` the projections and tags
    of all ranks are gathered (with gradient) so that the negatives and tag positives are those of
    the *global* batch; each rank averages the loss over its own anchors, so DDP's averaged
    gradient equals the one-process gradient (up to BatchNorm statistics, which are per rank on
    the CPU and synchronised on CUDA). The cached encoder is the backbone without the projection
    head (architecture ``"awcl_resnet2d"``, embedding = ``h``).

    Reference schedule: Adam 1e-3, weight decay 1e-6, batch 32, 10 epochs (METHODS.md §1). CPU
    scale-down: resnet10/18 at 64-96 px, batch 32-64, a few thousand steps.

    Args:
        data: the images (:func:`~.awcl_data.read_tagged_images`).
        ratio: anatomy ratio r in [0, 1] (0 = SimCLR).
        granularity: ``"coarse"`` or ``"fine"`` tags.
        backbone, widen_factor, norm, proj_hidden, proj_dim: see :class:`~AnatSSLLib.networks.awcl_net.AWCLNet`.
        tau, base_tau: see :func:`awcl_loss`.
        augment: keyword arguments of :func:`augment_views`.
        manifest: extra manifest fields (``spacing``, ``description``, ...).
    """

    method = "awcl"
    architecture = "awcl_resnet2d"

    def __init__(
        self,
        data: TaggedImageSet,
        ratio: float = 0.5,
        granularity: str = "fine",
        backbone: str = "resnet18",
        widen_factor: float = 1.0,
        norm: str | Sequence[Any] = "batch",
        proj_hidden: int | None = 512,
        proj_dim: int = 128,
        tau: float = 0.5,
        base_tau: float | None = 0.07,
        augment: Mapping[str, Any] | None = None,
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(data, TaggedImageSet):
            raise InputError(f"AWCLTask data: expected a TaggedImageSet, got {type(data).__name__}")
        self.data = data
        self.images = torch.from_numpy(np.ascontiguousarray(data.images, dtype=np.float32))
        self.sampler = AnatomyAwarePairSampler(data, ratio=ratio, granularity=granularity)
        self.tau = float(tau)
        self.base_tau = None if base_tau is None else float(base_tau)
        self.augment = dict(augment or {})
        self.model_params: dict[str, Any] = {
            "spatial_dims": 2,
            "in_channels": int(data.images.shape[1]),
            "backbone": str(backbone),
            "widen_factor": float(widen_factor),
            "norm": norm if isinstance(norm, str) else list(norm),
        }
        self.head_params = {"proj_hidden": None if proj_hidden is None else int(proj_hidden), "proj_dim": int(proj_dim)}
        self.manifest = dict(manifest or {})
        self._fingerprint: str | None = None

    @property
    def ratio(self) -> float:
        return self.sampler.ratio

    @property
    def granularity(self) -> str:
        return self.sampler.granularity

    def build_model(self) -> nn.Module:
        """A fresh :class:`~AnatSSLLib.networks.awcl_net.AWCLNet`."""
        from ..networks.awcl_net import AWCLNet

        return AWCLNet(**self.model_params, **self.head_params)

    def make_batch(
        self, step: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1, batch_size: int = 32
    ) -> dict[str, Tensor]:
        """The global batch's pairs drawn from ``generator``; this rank's rows:
        ``{"view1": (n,1,H,W), "view2": (n,1,H,W), "tags": (n,), "cross": (n,) bool}``."""
        from ..engine import batch_shard

        pairs = self.sampler.sample(int(batch_size), generator)
        v1 = augment_views(self.images[pairs["anchor"]], generator, **self.augment)
        v2 = augment_views(self.images[pairs["partner"]], generator, **self.augment)
        rows = batch_shard(int(batch_size), rank, world_size)
        cross = pairs["partner"] != pairs["anchor"]
        return {"view1": v1[rows], "view2": v2[rows], "tags": pairs["tags"][rows], "cross": cross[rows]}

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Mean AWCL loss over this rank's anchors (both views), and logs: ``tagged`` (fraction of
        pairs with a kept tag), ``cross`` (fraction with a cross-image partner), ``positives``
        (mean |A(i)|)."""
        v1, v2, tags = batch["view1"], batch["view2"], batch["tags"]
        n = v1.shape[0]
        z = model(torch.cat([v1, v2], dim=0))
        z1, z2 = z[:n], z[n:]
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            rank = dist.get_rank()
            z1g, z2g = _gather_cat(z1, True), _gather_cat(z2, True)
            tg = _gather_cat(tags, False)
            per = awcl_loss(torch.cat([z1g, z2g]), torch.cat([tg, tg]), self.tau, self.base_tau, reduction="none")
            ng = z1g.shape[0]
            own = torch.arange(rank * n, (rank + 1) * n, device=per.device)
            loss = torch.cat([per[own], per[own + ng]]).mean()
            pos = awcl_positive_mask(torch.cat([tg, tg]))
        else:
            loss = awcl_loss(torch.cat([z1, z2]), torch.cat([tags, tags]), self.tau, self.base_tau)
            pos = awcl_positive_mask(torch.cat([tags, tags]))
        logs = {
            "tagged": float((tags >= 0).float().mean()),
            "cross": float(batch["cross"].float().mean()) if "cross" in batch else 0.0,
            "positives": float(pos.sum(dim=1).float().mean()),
        }
        return loss, logs

    def export_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The encoder's state (backbone without the projection head), for ``awcl_resnet2d``."""
        return dict(model.encoder.state_dict())

    def manifest_fields(self) -> dict[str, Any]:
        """Cache-manifest fields; ``ratio``, ``granularity``, ``tau`` go to the manifest's extras."""
        from ..networks.awcl_net import backbone_feature_dim

        if self._fingerprint is None:
            self._fingerprint = self.data.fingerprint()
        fields: dict[str, Any] = {
            "method": self.method,
            "architecture": self.architecture,
            "architecture_params": dict(self.model_params),
            "embedding_dim": backbone_feature_dim(self.model_params["backbone"], self.model_params["widen_factor"]),
            "spatial_dims": 2,
            "spacing": None,
            "intensity": dict(self.data.intensity),
            "data_fingerprint": self._fingerprint,
            "image_size": list(self.data.size),
            "anatomy_ratio": self.ratio,
            "granularity": self.granularity,
            "tau": self.tau,
            "base_tau": self.base_tau,
            "projection": dict(self.head_params),
            "augment": {k: list(v) if isinstance(v, tuple) else v for k, v in self.augment.items()},
        }
        fields.update(self.manifest)
        fields.setdefault(
            "description",
            f"AWCL {self.model_params['backbone']}, {self.granularity} tags, anatomy ratio {self.ratio:g}, "
            f"{len(self.data)} images at {self.data.size[0]}x{self.data.size[1]}",
        )
        return fields
