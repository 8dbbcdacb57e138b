"""Alice: anatomical invariance modelling and semantic alignment (3D self-supervised pretraining).

Jiang et al., ICCV 2023 (arXiv 2302.05615); reference code ``alibaba-damo-academy/alice`` @ d45cfcd
(Apache-2.0): ``engine_pretrain.py``, ``loss.py``, ``CASA/CASA_Module.py``, ``models/head.py``,
``utils.py``. Our own code, written from METHODS.md section 4; the paper's CAFA is the code's CASA.

One training step (student masked, EMA teacher clean, both views Q and K of the same anatomy):

1. View mining (:func:`mine_views`): Q around a random body point of volume A; K around the point
   an anatomical matcher (SAM in the paper) finds in volume B, retried until its score exceeds
   0.7 (at most 100 tries). Same-volume mode: two overlapping, independently intensity-augmented
   crops of one volume with a known offset.
2. Masking (:func:`block_mask`): SimMIM block mask, ratio 0.75, in-plane blocks spanning the full
   depth; masked voxels zeroed and masked tokens replaced by a learnable token (student only,
   as the code; the figure also draws teacher masks).
3. Networks (:class:`AliceModel`): student and teacher :class:`~AnatSSLLib.networks.AliceNet`,
   :class:`AliceHead` (DINO/iBOT head: cls prototypes, patch prototypes), :class:`CAFA`.
4. Loss (:class:`AliceLoss`): ``L = L_cls + L_patch + 10 L_rec`` (see there).
5. EMA (:func:`ema_update`): after each optimizer step, teacher <- m teacher + (1 - m) student,
   ``m`` cosine from 0.996 to 1 (:func:`momentum_schedule`).

Deliberate differences from the code (METHODS.md 4.6 lists its defects; none is reproduced):
the head builds (the code's ``AliceHead`` cannot: ``super(Att_iBOTHead, ...)``); every batch item
has its own crop coordinates (the code crops every item at the same place); the centre update
all-reduces only when ``torch.distributed`` is initialised with more than one process (the code
requires a process group); the reconstruction mask can be used (``rec_region="masked"``); the
augmentations of the same-volume mode are used (the code computes and drops them; its
cross-volume views are not augmented, as here by default). The second volume is drawn at random
from the step's generator (the code uses the previous iteration's volume, a one-deep queue):
same distribution, and it keeps the engine's "batch = f(seed, step)" contract.

Optimisation (:func:`reference_optimisation`, used by ``anatssl pretrain --method alice``): the
code's AdamW with weight decay 0.04, linear warm-up over the first 5 % of the run, cosine decay and
gradient clipping at 3. Not in the engine's loop and therefore not here: separate weight-decay
groups (norms and biases excluded) and the weight-decay schedule 0.04 -> 0.4; the engine applies
one decay to all trained parameters. Freezing the prototype layers during the first steps is done
with gradient hooks (``freeze_last_layer_steps``).
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..networks.alice_net import AliceNet, AliceOutput, resolve_norm

__all__ = [
    "block_mask",
    "block_masks",
    "WeightNormLinear",
    "DINOHead",
    "AliceHead",
    "dino_loss",
    "update_centre",
    "CAFA",
    "reconstruction_loss",
    "RecRegion",
    "ema_update",
    "momentum_schedule",
    "reference_optimisation",
    "teacher_temperature",
    "AliceLoss",
    "AliceModel",
    "MinedViews",
    "mine_views",
    "crop_at",
    "ViewMode",
    "CafaKeys",
    "AliceTask",
]

Matcher = Callable[[np.ndarray], "tuple[np.ndarray, float]"]


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return cls(getattr(value, "value", value))
    except ValueError:
        raise InputError(f"{name}: expected one of {[e.value for e in cls]}, got {value!r}") from None


# ------------------------------------------------------------------------------------------ masks


def block_mask(
    shape: Sequence[int],
    block: int,
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    columns: bool = True,
    column_axis: int = 0,
) -> Tensor:
    """SimMIM block mask of one 3D crop: bool ``shape`` (``D, H, W``), True = masked.

    With ``columns=True`` (Alice's code, ``utils.MaskGenerator``) the two axes other than
    ``column_axis`` are tiled by ``block x block`` squares; exactly ``ceil(ratio * n_squares)``
    squares, chosen uniformly without replacement, are masked, each through the whole length of
    ``column_axis`` (a column). In our ``[k, j, i]`` arrays axis 0 is the slice axis, so the default
    columns run across slices, as the code's (masks in the axial plane, full depth). With
    ``columns=False`` the crop is tiled by ``block^3`` cubes and ``ceil(ratio * n_cubes)`` are masked.

    Raises:
        InputError: a size not divisible by ``block`` or a ratio outside ``[0, 1]``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise InputError(f"block_mask shape: expected 3 sizes (D, H, W), got {shape}")
    block = int(block)
    if block < 1 or any(s % block for s in shape):
        raise InputError(f"block_mask: every size of {shape} must be divisible by the block {block}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise InputError(f"block_mask ratio: expected a number in [0, 1], got {ratio!r}")
    if columns:
        axis = int(column_axis) % 3
        plane = [a for a in range(3) if a != axis]
        grid = [shape[a] // block for a in plane]
    else:
        grid = [s // block for s in shape]
    n = int(np.prod(grid))
    k = int(math.ceil(float(ratio) * n - 1e-9))
    chosen = torch.randperm(n, generator=generator)[:k]
    flat = torch.zeros(n, dtype=torch.bool)
    flat[chosen] = True
    m = flat.view(*grid)
    for dim in range(m.ndim):
        m = m.repeat_interleave(block, dim=dim)
    if columns:
        m = m.unsqueeze(axis).expand(shape).contiguous()
    return m


def block_masks(
    n: int, shape: Sequence[int], block: int, ratio: float = 0.75, generator: torch.Generator | None = None,
    columns: bool = True, column_axis: int = 0,
) -> Tensor:
    """``n`` independent :func:`block_mask` draws as a float tensor ``n, 1, D, H, W`` (1 = masked)."""
    return torch.stack(
        [block_mask(shape, block, ratio, generator, columns, column_axis) for _ in range(int(n))]
    ).unsqueeze(1).float()


# ------------------------------------------------------------------------------------------ heads


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: ``y = g * (V / ||V||_row) x``.

    With ``learn_g=False`` (DINO's ``norm_last_layer=True``) ``g`` is fixed to 1, i.e. the rows of
    the weight are unit prototypes and ``y`` are cosine similarities times ``||x||``.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_g: bool = False) -> None:
        super().__init__()
        lin = nn.Linear(int(in_dim), int(out_dim), bias=False)  # default (Kaiming-uniform) init
        self.v = nn.Parameter(lin.weight.detach().clone())
        self.g = nn.Parameter(torch.ones(int(out_dim), 1), requires_grad=bool(learn_g))

    @property
    def weight(self) -> Tensor:
        """The effective weight ``out_dim, in_dim``."""
        return self.g * F.normalize(self.v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO projection head: 3-layer MLP (GELU) -> L2 -> weight-normalised prototypes.

    ``z = W_n(normalize(MLP(x)))`` with ``MLP = Linear(in, hidden)-GELU-Linear(hidden, hidden)-GELU-
    Linear(hidden, bottleneck)`` and ``W_n`` a :class:`WeightNormLinear` (``g = 1`` when
    ``norm_last_layer``). Alice: hidden 2048, bottleneck 256, 512 prototypes; CPU scale-down 256,
    64, 128. Linear layers start from a truncated normal (std 0.02) with zero bias.

    Input ``..., in_dim`` -> logits ``..., out_dim``.
    """

    def __init__(
        self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out_dim: int = 512,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, learn_g=not norm_last_layer)
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck features ``..., bottleneck``."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))


class AliceHead(nn.Module):
    """Alice's head on (cls, encoder tokens, decoder tokens): one shared DINO MLP, two prototype layers.

    Linear input maps bring the three inputs to ``in_dim`` (the code maps encoder 384 and decoder
    192 tokens; our cls comes from a deeper stage and gets its own map), then the shared MLP and
    L2; cls goes to the cls prototypes, tokens to the patch prototypes. The student keeps separate
    cls and patch prototype layers (``shared_prototypes=False``); the teacher shares one (iBOT's
    default, the code's ``shared_head_teacher=True``).

    Returns ``(cls_logits B, K; enc_logits B, Ne, K; dec_logits B, Nd, K)``.
    """

    def __init__(
        self, cls_dim: int, enc_dim: int, dec_dim: int, in_dim: int | None = None, hidden: int = 2048,
        bottleneck: int = 256, out_dim: int = 512, norm_last_layer: bool = True, shared_prototypes: bool = False,
    ) -> None:
        super().__init__()
        in_dim = int(enc_dim if in_dim is None else in_dim)
        self.cls_in = nn.Linear(cls_dim, in_dim)
        self.enc_in = nn.Linear(enc_dim, in_dim)
        self.dec_in = nn.Linear(dec_dim, in_dim)
        self.dino = DINOHead(in_dim, hidden, bottleneck, out_dim, norm_last_layer)
        self.shared_prototypes = bool(shared_prototypes)
        self.patch_layer = None if shared_prototypes else WeightNormLinear(bottleneck, out_dim, not norm_last_layer)

    def prototype_layers(self) -> list[WeightNormLinear]:
        """The weight-normalised last layers (cls, and patch unless shared)."""
        return [self.dino.last_layer] + ([self.patch_layer] if self.patch_layer is not None else [])

    def forward(self, cls: Tensor, enc: Tensor, dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        patch = self.patch_layer if self.patch_layer is not None else self.dino.last_layer
        c = self.dino.last_layer(self.dino.bottleneck(self.cls_in(cls)))
        e = patch(self.dino.bottleneck(self.enc_in(enc)))
        d = patch(self.dino.bottleneck(self.dec_in(dec)))
        return c, e, d


# ----------------------------------------------------------------------------------- DINO loss


def dino_loss(
    student_logits: Tensor, teacher_logits: Tensor, centre: Tensor | float = 0.0, tau_s: float = 0.1,
    tau_t: float = 0.01,
) -> Tensor:
    """DINO cross-entropy ``H(P_t, P_s)`` averaged over every leading index.

    ``P_t = softmax((t - c) / tau_t)`` (centred and sharpened teacher, no gradient),
    ``P_s = softmax(s / tau_s)``, ``H(a, b) = -sum_k a_k log b_k``.

    Args:
        student_logits, teacher_logits: ``..., K`` (same shape).
        centre: broadcastable to ``..., K`` (the running mean of the teacher logits).
        tau_s, tau_t: student and teacher temperatures (Alice 0.1 and 0.008 -> 0.01).

    Known answer: uniform student logits give ``log K`` whatever the teacher.
    """
    if student_logits.shape != teacher_logits.shape:
        raise InputError(
            f"dino_loss: student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            f"logits must have the same shape"
        )
    p_t = F.softmax((teacher_logits.detach().float() - centre) / float(tau_t), dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / float(tau_s), dim=-1)
    return -(p_t * log_p_s).sum(dim=-1).mean()


@torch.no_grad()
def update_centre(centre: Tensor, teacher_logits: Tensor, m: float = 0.9) -> Tensor:
    """New centre ``m c + (1 - m) mean(teacher_logits)``; the mean is over every leading index.

    ``centre``: ``K`` or ``1, K`` or ``1, 1, K`` (shape kept); ``teacher_logits``: ``..., K``.
    Under ``torch.distributed`` (initialised, more than one process) the mean is over all ranks
    (all-reduce of the sums and counts); otherwise no collective is called.
    """
    k = teacher_logits.shape[-1]
    flat = teacher_logits.detach().float().reshape(-1, k)
    total = flat.sum(dim=0)
    count = torch.tensor(float(flat.shape[0]), device=flat.device)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.cat([total, count.view(1)])
        dist.all_reduce(packed)
        total, count = packed[:-1], packed[-1]
    mean = (total / count).to(centre.dtype).view(centre.shape)
    return centre * m + mean * (1.0 - m)


# ------------------------------------------------------------------------------------------ CAFA


class CAFA(nn.Module):
    """Conditional anatomical feature alignment (the code's CASA): one cross-attention layer.

    With query tokens ``q`` (``B, Nq, dim``: the student's encoder-token logits of the masked view)
    and key/value tokens ``f`` (``B, Nk, dim``: the student's own decoder-token logits, or the
    teacher's), per head ``h`` of width ``d_h``::

        A_h = softmax((q W_q^h)(f W_k^h)^T / sqrt(d_h))            # B, Nq, Nk
        O   = W_o [A_1 f W_v^1, ..., A_H f W_v^H]                  # attention output
        X   = LayerNorm(q + Dropout(O))                            # residual + LN
        Y   = LayerNorm(X + Dropout(W_2 ReLU(W_1 X + b_1) + b_2))  # FFN residual + LN

    ``W_q, W_k, W_v: dim -> H d_h`` and ``W_o: H d_h -> dim`` have no bias; the attention weights
    get dropout too. Alice: dim 512 (the prototype logits), 8 heads x 64, FFN 2048, dropout 0.1;
    one module shared by the student and teacher paths (the code; the paper's figure has an EMA
    copy on the teacher side).

    :meth:`attention` returns ``O`` and the weights ``A`` (before the residual and the norms): with
    zero ``W_q`` or ``W_k`` the weights are uniform and ``O = W_o W_v mean_j f_j``.
    """

    def __init__(
        self, dim: int, heads: int = 8, dim_head: int = 64, ff: int | None = None, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.dim, self.heads, self.dim_head = int(dim), int(heads), int(dim_head)
        inner = self.heads * self.dim_head
        self.w_q = nn.Linear(dim, inner, bias=False)
        self.w_k = nn.Linear(dim, inner, bias=False)
        self.w_v = nn.Linear(dim, inner, bias=False)
        self.w_o = nn.Linear(inner, dim, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        ff = 4 * self.dim if ff is None else int(ff)
        self.ff1 = nn.Linear(dim, ff)
        self.ff2 = nn.Linear(ff, dim)
        self.ff_drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def attention(self, query: Tensor, kv: Tensor) -> tuple[Tensor, Tensor]:
        """``O`` (``B, Nq, dim``) and the attention weights ``A`` (``B, H, Nq, Nk``)."""
        if query.ndim != 3 or kv.ndim != 3 or query.shape[0] != kv.shape[0] or query.shape[2] != self.dim or kv.shape[2] != self.dim:
            raise InputError(
                f"CAFA: expected query B,Nq,{self.dim} and keys B,Nk,{self.dim}, got {tuple(query.shape)} "
                f"and {tuple(kv.shape)}"
            )
        b, nq, _ = query.shape
        nk = kv.shape[1]
        q = self.w_q(query).view(b, nq, self.heads, self.dim_head).transpose(1, 2)
        k = self.w_k(kv).view(b, nk, self.heads, self.dim_head).transpose(1, 2)
        v = self.w_v(kv).view(b, nk, self.heads, self.dim_head).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.dim_head), dim=-1)
        o = (self.attn_drop(a) @ v).transpose(1, 2).reshape(b, nq, self.heads * self.dim_head)
        return self.w_o(o), a

    def forward(self, query: Tensor, kv: Tensor) -> Tensor:
        """``query`` ``B, Nq, dim``, ``kv`` ``B, Nk, dim`` -> aligned query tokens ``B, Nq, dim``."""
        o, _ = self.attention(query, kv)
        x = self.norm1(query + self.drop(o))
        y = self.ff2(F.relu(self.ff1(x)))
        return self.norm2(x + self.ff_drop(y))


# -------------------------------------------------------------------------------- reconstruction


class RecRegion(str, enum.Enum):
    """Voxels the reconstruction loss averages over."""

    ALL = "all"  # the code: every voxel (the mask is unused)
    MASKED = "masked"  # SimMIM: masked voxels only


def reconstruction_loss(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, region: RecRegion | str = RecRegion.ALL
) -> Tensor:
    """Mean squared error ``mean_v (pred_v - target_v)^2`` over ``region``.

    Args:
        pred, target: ``B, C, *S``.
        mask: ``B, 1, *S`` (1 = masked), needed for ``region="masked"``.
        region: ``"all"`` (Alice's code: ``MSELoss`` over every voxel, the mask computed but
            unused) or ``"masked"`` (SimMIM's loss: ``sum m (p - t)^2 / (C sum m)``). The paper's
            text (not available to us offline: only its abstract is) should say which is intended;
            the code's choice is the default here.
    """
    region = _enum(RecRegion, region, "reconstruction_loss region")
    if pred.shape != target.shape:
        raise InputError(f"reconstruction_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = (pred.float() - target.float()) ** 2
    if region is RecRegion.ALL:
        return err.mean()
    if mask is None:
        raise InputError("reconstruction_loss: region='masked' needs the mask (B, 1, *S)")
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------- EMA, schedules


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> int:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for the parameters the two modules share by name.

    Only the teacher's parameters (deduplicated, so a shared prototype layer is updated once) whose
    name the student also has are updated; returns how many. ``m = 1`` leaves the teacher
    unchanged, ``m = 0`` copies the student.
    """
    if not 0.0 <= float(m) <= 1.0:
        raise InputError(f"ema_update momentum: expected a number in [0, 1], got {m!r}")
    own = dict(student.named_parameters())
    n = 0
    for name, p_t in teacher.named_parameters():
        p_s = own.get(name)
        if p_s is None or p_s.shape != p_t.shape:
            continue
        p_t.mul_(float(m)).add_(p_s.detach().to(p_t.dtype), alpha=1.0 - float(m))
        n += 1
    return n


def reference_optimisation(steps: int) -> dict[str, Any]:
    """:class:`~AnatSSLLib.engine.TrainingConfig` fields of the reference code's optimisation for a
    run of ``steps`` steps (METHODS.md 4.5): AdamW, weight decay 0.04, linear warm-up over the
    first 5 % of the steps (the code: 50 of 1000 epochs, at least 1 step), then cosine decay to 0,
    gradient norm clipped at 3.

    Measured here (``benchmarks/README.md``): with a constant learning rate and no clipping the DINO
    token loss swung between ~1e-26 and ~21 from step to step at batch 2; with this recipe it stays
    near 3-4.
    """
    return {"optimizer": "adamw", "weight_decay": 0.04, "schedule": "cosine", "grad_clip": 3.0,
            "warmup_steps": max(1, round(0.05 * int(steps)))}  # fmt: skip


def momentum_schedule(step: int, total: int, base: float = 0.996) -> float:
    """Teacher momentum at 0-based ``step`` of ``total``: cosine from ``base`` (step 0) to 1 (step total).

    ``m(s) = 1 - (1 - base) (cos(pi s / total) + 1) / 2``.
    """
    total = max(int(total), 1)
    s = min(max(int(step), 0), total)
    return 1.0 - (1.0 - float(base)) * (math.cos(math.pi * s / total) + 1.0) / 2.0


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.008, end: float = 0.01) -> float:
    """Teacher temperature: linear from ``start`` (step 0) to ``end`` (step ``warmup_steps``), then ``end``.

    Alice: 0.008 -> 0.01 over its first 30 epochs (for cls and patch logits alike).
    """
    if int(warmup_steps) <= 0:
        return float(end)
    f = min(max(int(step), 0) / int(warmup_steps), 1.0)
    return float(start) + (float(end) - float(start)) * f


# ------------------------------------------------------------------------------------------ loss


class AliceLoss(nn.Module):
    """``L = w_cls L_cls + w_patch L_patch + w_rec L_rec`` (Alice: 1, 1, 10); holds the two centres.

    With student logits ``s``, teacher logits ``t``, views Q and K, ``P_t``/``P_s``/``H`` as in
    :func:`dino_loss`:

    - ``L_cls = 1/2 [H(P_t(t_cls^Q), P_s(s_cls^K)) + H(P_t(t_cls^K), P_s(s_cls^Q))]`` (cross-view,
      centre ``c1``), each averaged over the batch.
    - ``L_patch = 1/2 sum_v mean_tokens H(P_t(T_v), P_s(S_v))`` (centre ``c2``) with ``S_v`` =
      CAFA(student encoder tokens of v, student decoder tokens of v) and ``T_v`` = CAFA(same query,
      teacher decoder tokens). Without CAFA (ablation ``use_cafa=False``) ``S_v``/``T_v`` are the
      raw student/teacher encoder-token logits of view v (an iBOT-style token loss).
    - ``L_rec = 1/2 MSE([Q; K], [Q^; K^])`` (:func:`reconstruction_loss`; the 1/2 is the code's).
      Ablation ``use_generative=False``: weight 0.

    Centres: ``c <- 0.9 c + 0.1 mean(teacher)`` after each call in training mode (:func:`update_centre`).
    """

    def __init__(
        self, out_dim: int, tau_s: float = 0.1, centre_momentum: float = 0.9, w_cls: float = 1.0,
        w_patch: float = 1.0, w_rec: float = 10.0, use_cafa: bool = True, use_generative: bool = True,
        rec_region: RecRegion | str = RecRegion.ALL,
    ) -> None:
        super().__init__()
        self.tau_s = float(tau_s)
        self.centre_momentum = float(centre_momentum)
        self.w_cls, self.w_patch = float(w_cls), float(w_patch)
        self.w_rec = float(w_rec) if use_generative else 0.0
        self.use_cafa, self.use_generative = bool(use_cafa), bool(use_generative)
        self.rec_region = _enum(RecRegion, rec_region, "AliceLoss rec_region")
        self.register_buffer("centre_cls", torch.zeros(1, int(out_dim)))
        self.register_buffer("centre_patch", torch.zeros(1, 1, int(out_dim)))

    def forward(
        self, s_cls: Tensor, t_cls: Tensor, s_patch: Tensor, t_patch: Tensor, reconstruction: Tensor,
        images: Tensor, masks: Tensor | None, tau_t: float,
    ) -> dict[str, Tensor]:
        """Terms of the loss; first half of every batch is view Q, second half view K.

        Args:
            s_cls, t_cls: ``2B, K``. s_patch, t_patch: ``2B, N, K``.
            reconstruction, images: ``2B, C, *S``; masks: ``2B, 1, *S`` or None.
            tau_t: teacher temperature.

        Returns:
            ``{"loss", "cls", "patch", "rec"}`` (scalars; ``rec`` unweighted).
        """
        b2 = s_cls.shape[0]
        if b2 % 2 or t_cls.shape[0] != b2:
            raise InputError(f"AliceLoss: expected 2B rows (Q then K), got {b2} and {t_cls.shape[0]}")
        b = b2 // 2
        s_q, s_k = s_cls[:b], s_cls[b:]
        t_q, t_k = t_cls[:b], t_cls[b:]
        l_cls = 0.5 * (
            dino_loss(s_k, t_q, self.centre_cls, self.tau_s, tau_t)
            + dino_loss(s_q, t_k, self.centre_cls, self.tau_s, tau_t)
        )
        l_patch = dino_loss(s_patch, t_patch, self.centre_patch, self.tau_s, tau_t)
        if self.w_rec > 0:
            l_rec = 0.5 * reconstruction_loss(reconstruction, images, masks, self.rec_region)
        else:
            l_rec = torch.zeros((), device=s_cls.device)
        total = self.w_cls * l_cls + self.w_patch * l_patch + self.w_rec * l_rec
        if self.training:
            self.centre_cls.copy_(update_centre(self.centre_cls, t_cls, self.centre_momentum))
            self.centre_patch.copy_(update_centre(self.centre_patch, t_patch, self.centre_momentum))
        return {"loss": total, "cls": l_cls.detach(), "patch": l_patch.detach(), "rec": l_rec.detach()}


# ------------------------------------------------------------------------------------------ model


class CafaKeys(str, enum.Enum):
    """Which teacher tokens CAFA's teacher path reads."""

    SAME = "same"  # the code: the teacher's tokens of the same view
    MATCHED = "matched"  # the other (anatomically matched) view's teacher tokens


class AliceModel(nn.Module):
    """Student, EMA teacher, heads, CAFA and the loss (with its centres) in one module.

    ``forward(q, k, mask_q, mask_k, tau_t)`` runs one Alice step and returns the loss terms (see
    :class:`AliceLoss`); the engine's optimizer sees the student, its head and CAFA (the teacher
    has ``requires_grad=False``). Two counters (buffers, so checkpoints keep them): ``loss_calls``
    (training forward calls = optimizer steps taken once the next call starts) and
    ``ema_updates``; :meth:`catch_up_ema` applies the EMA updates still due, so the teacher
    follows the student whether the EMA runs in a post-step hook or at the start of the next step.

    Args:
        net: :class:`AliceNet` keyword arguments.
        head: :class:`AliceHead` keyword arguments (``hidden``, ``bottleneck``, ``out_dim``,
            ``in_dim``, ``norm_last_layer``).
        cafa: :class:`CAFA` keyword arguments (``heads``, ``dim_head``, ``ff``, ``dropout``).
        loss: :class:`AliceLoss` keyword arguments (``use_cafa``, ``use_generative``, ...).
        cafa_keys: ``"same"`` (code) or ``"matched"`` (see :class:`CafaKeys`).
    """

    def __init__(
        self, net: Mapping[str, Any] | None = None, head: Mapping[str, Any] | None = None,
        cafa: Mapping[str, Any] | None = None, loss: Mapping[str, Any] | None = None,
        cafa_keys: CafaKeys | str = CafaKeys.SAME,
    ) -> None:
        super().__init__()
        self.student = AliceNet(**dict(net or {}))
        ch = self.student.channels
        hp = {"hidden": 2048, "bottleneck": 256, "out_dim": 512}
        hp.update(dict(head or {}))
        self.student_head = AliceHead(ch["cls"], ch["enc"], ch["dec"], shared_prototypes=False, **hp)
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = AliceHead(ch["cls"], ch["enc"], ch["dec"], shared_prototypes=True, **hp)
        ema_update(self.teacher_head, self.student_head, 0.0)  # same initial weights
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        out_dim = int(hp["out_dim"])
        self.cafa = CAFA(out_dim, **dict(cafa or {}))
        self.loss_fn = AliceLoss(out_dim, **dict(loss or {}))
        self.cafa_keys = _enum(CafaKeys, cafa_keys, "AliceModel cafa_keys")
        self.register_buffer("loss_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def catch_up_ema(self, momentum: Callable[[int], float]) -> int:
        """Apply the EMA updates due (one per optimizer step taken); ``momentum(i)`` gives update i's m."""
        n = 0
        while int(self.ema_updates) < int(self.loss_calls):
            i = int(self.ema_updates)
            m = float(momentum(i))
            ema_update(self.teacher, self.student, m)
            ema_update(self.teacher_head, self.student_head, m)
            self.ema_updates += 1
            n += 1
        return n

    def prototype_parameters(self) -> list[nn.Parameter]:
        """The student's prototype-layer parameters (frozen during the first steps if asked)."""
        return [p for layer in self.student_head.prototype_layers() for p in layer.parameters()]

    def forward(
        self, q: Tensor, k: Tensor, mask_q: Tensor | None = None, mask_k: Tensor | None = None, tau_t: float = 0.01,
    ) -> dict[str, Tensor]:
        """One step: ``q``, ``k`` ``B, C, *S``; masks ``B, 1, *S`` (student only) -> loss terms."""
        if q.shape != k.shape:
            raise InputError(f"AliceModel: views Q {tuple(q.shape)} and K {tuple(k.shape)} must have the same shape")
        b = q.shape[0]
        images = torch.cat([q, k], dim=0)
        masks = None
        if mask_q is not None or mask_k is not None:
            if mask_q is None or mask_k is None:
                raise InputError("AliceModel: give both masks or neither")
            masks = torch.cat([mask_q, mask_k], dim=0).to(images.dtype)
        with torch.no_grad():
            t_out: AliceOutput = self.teacher(images)
            t_cls, t_enc, t_dec = self.teacher_head(t_out.cls, t_out.enc_tokens, t_out.dec_tokens)
        s_out: AliceOutput = self.student(images, masks)
        s_cls, s_enc, s_dec = self.student_head(s_out.cls, s_out.enc_tokens, s_out.dec_tokens)
        if self.loss_fn.use_cafa:
            keys_t = t_dec if self.cafa_keys is CafaKeys.SAME else torch.cat([t_dec[b:], t_dec[:b]], dim=0)
            s_patch = self.cafa(s_enc, s_dec)
            t_patch = self.cafa(s_enc, keys_t)
        else:
            s_patch, t_patch = s_enc, t_enc
        terms = self.loss_fn(s_cls, t_cls, s_patch, t_patch, s_out.reconstruction, images, masks, tau_t)
        return terms


# ------------------------------------------------------------------------------------ view mining


@dataclass
class MinedViews:
    """Two crops of the same anatomy and their correspondence.

    Attributes:
        q, k: the crops, ``D, H, W`` float32 (zero outside the volumes).
        centre_q: crop centre of Q in volume A, voxel index ``(k, j, i)``.
        centre_k: crop centre of K, in volume B (cross-volume) or in volume A (same-volume).
        score: the matcher's score at ``centre_k`` (1.0 in same-volume mode).
        tries: points tried. accepted: the score exceeded ``min_score`` (or same-volume mode).
        mode: ``"same"`` or ``"cross"``.
    """

    q: np.ndarray
    k: np.ndarray
    centre_q: np.ndarray
    centre_k: np.ndarray
    score: float
    tries: int
    accepted: bool
    mode: str
    info: dict = field(default_factory=dict)

    @property
    def offset(self) -> np.ndarray:
        """``centre_k - centre_q`` in voxels (meaningful in same-volume mode: K's shift in A)."""
        return np.asarray(self.centre_k) - np.asarray(self.centre_q)


def _crop_size(crop: int | Sequence[int]) -> tuple[int, int, int]:
    c = (int(crop),) * 3 if np.isscalar(crop) else tuple(int(v) for v in crop)
    if len(c) != 3 or min(c) < 1:
        raise InputError(f"crop: expected a positive size or three sizes, got {crop!r}")
    return c  # type: ignore[return-value]


def crop_at(volume: np.ndarray, centre: Sequence[float], crop: int | Sequence[int]) -> np.ndarray:
    """Crop of size ``crop`` whose voxel ``crop // 2`` sits on ``centre`` (rounded), zero-padded outside."""
    size = _crop_size(crop)
    c = np.rint(np.asarray(centre, dtype=float)).astype(int)
    out = np.zeros(size, dtype=np.float32)
    lo = c - np.asarray(size) // 2
    src, dst = [], []
    for ax in range(3):
        a0, a1 = max(lo[ax], 0), min(lo[ax] + size[ax], volume.shape[ax])
        if a1 <= a0:
            return out
        src.append(slice(a0, a1))
        dst.append(slice(a0 - lo[ax], a1 - lo[ax]))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _random_body_point(volume: np.ndarray, rng: np.random.Generator, threshold: float) -> np.ndarray:
    shape = np.asarray(volume.shape)
    for _ in range(1000):
        p = (rng.random(3) * shape).astype(int)
        if volume[tuple(p)] > threshold:
            return p
    idx = np.flatnonzero(volume > threshold)
    if idx.size == 0:
        raise InputError(f"mine_views: the volume has no voxel above {threshold} (no body to crop)")
    return np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), volume.shape))


def _augment(x: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Intensity augmentation keeping voxel correspondence: gamma, contrast/brightness, Gaussian noise."""
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return x.copy()
    u = (x - lo) / (hi - lo)
    u = u ** rng.uniform(1 - 0.3 * strength, 1 + 0.5 * strength)
    u = (u - u.mean()) * rng.uniform(1 - 0.25 * strength, 1 + 0.25 * strength) + u.mean()
    u = u + rng.uniform(-0.1, 0.1) * strength
    u = u + rng.normal(0.0, 0.05 * strength, size=u.shape)
    return (u * (hi - lo) + lo).astype(np.float32)


def mine_views(
    volume_a: np.ndarray,
    volume_b: np.ndarray | None,
    crop: int | Sequence[int],
    matcher: Matcher | None = None,
    rng: np.random.Generator | None = None,
    min_score: float = 0.7,
    retries: int = 100,
    body_threshold: float = 0.0,
    max_offset: int | Sequence[int] | None = None,
    augment: bool | None = None,
) -> MinedViews:
    """Mine two views (Q, K) of the same anatomy (Alice, METHODS.md 4.1).

    - **Cross-volume** (``volume_b`` given): a random body point ``p`` of A (value above
      ``body_threshold``); ``matcher(p) -> (p', score)`` gives its counterpart in B; retry with a
      new ``p`` up to ``retries`` times until ``score > min_score`` (Alice: SAM, 0.7, 100). If no
      try passes, the best-scoring one is returned with ``accepted=False``. Q is cropped around
      ``p`` in A, K around ``p'`` in B. Not augmented by default (the code computes augmented
      copies but trains on the plain crops).
    - **Same-volume** (``volume_b`` None): Q around a random body point of A, K around it shifted
      by a uniform integer offset of at most ``max_offset`` voxels per axis (default a quarter of
      the crop, so the crops overlap by at least half per axis); both crops get independent
      intensity augmentation (gamma, contrast, brightness, noise), which keeps the known
      voxel correspondence ``K[x] = A[x + centre_k - crop//2]``.

    Points are voxel indices ``(k, j, i)`` of the arrays (index 0 = slice axis). A matcher working in
    physical space (e.g. the landmark tool in LPS mm) is wrapped with the images' index/physical maps.

    Args:
        volume_a, volume_b: ``D, H, W`` arrays (intensity-normalised, background at or below
            ``body_threshold``).
        crop: crop size (int or three ints).
        matcher: ``(3,) index in A -> ((3,) index in B, score)``; required for cross-volume mode.
        rng: numpy generator (default: a fresh unseeded one).

    Raises:
        InputError: a volume that is not 3D or has no body voxel; cross-volume mode without matcher.
    """
    rng = np.random.default_rng() if rng is None else rng
    size = _crop_size(crop)
    a = np.asarray(volume_a)
    if a.ndim != 3:
        raise InputError(f"mine_views volume_a: expected a 3D array, got shape {a.shape}")
    if volume_b is None:
        half = np.asarray(size) // 4 if max_offset is None else np.broadcast_to(np.asarray(max_offset, dtype=int), (3,))
        p = _random_body_point(a, rng, body_threshold)
        off = np.array([rng.integers(-int(h), int(h) + 1) for h in half])
        pk = p + off
        q, k = crop_at(a, p, size), crop_at(a, pk, size)
        if augment is None or augment:
            q, k = _augment(q, rng), _augment(k, rng)
        return MinedViews(q, k, p.astype(float), pk.astype(float), 1.0, 1, True, "same")
    b = np.asarray(volume_b)
    if b.ndim != 3:
        raise InputError(f"mine_views volume_b: expected a 3D array, got shape {b.shape}")
    if matcher is None:
        raise InputError("mine_views: cross-volume mining needs a matcher(point_in_a) -> (point_in_b, score)")
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    tries = 0
    for tries in range(1, max(int(retries), 1) + 1):
        p = _random_body_point(a, rng, body_threshold)
        pb, score = matcher(p.astype(float))
        pb = np.asarray(pb, dtype=float).reshape(3)
        if best is None or float(score) > best[0]:
            best = (float(score), p.astype(float), pb)
        if float(score) > min_score:
            break
    assert best is not None
    score, p, pb = best
    q, k = crop_at(a, p, size), crop_at(b, pb, size)
    if augment:
        q, k = _augment(q, rng), _augment(k, rng)
    return MinedViews(q, k, p, pb, score, tries, score > min_score, "cross")


# ------------------------------------------------------------------------------------------- task


class ViewMode(str, enum.Enum):
    """How :class:`AliceTask` draws its (Q, K) pairs."""

    MINED = "mined"  # cross-volume, matcher-mined (Alice); same-volume if no matcher / one volume
    SAME = "same"  # overlapping crops of one volume with a known offset
    RANDOM = "random"  # ablation: unrelated random crops of two volumes


class AliceTask:
    """Alice as a task for :func:`AnatSSLLib.engine.train`.

    A *sample* is a pair of views (Q, K) mined by :func:`mine_views` plus their student masks. The
    whole global batch is drawn from the step's generator (volumes, points, offsets, masks), then
    this rank's rows are returned. ``loss`` first applies the EMA update due from the previous
    optimizer step (:meth:`AliceModel.catch_up_ema`; the engine has no post-step hook: an engine
    that calls ``task.after_step(model, step)`` after ``optimizer.step()`` gets it there instead,
    and the result is identical), then runs :class:`AliceModel`.

    Args:
        volumes: ``D, H, W`` arrays, intensity-normalised to about [0, 1] with background 0
            (Alice: CT clipped to [-125, 225] HU and scaled to [0, 1]).
        steps: total optimizer steps of the run (for the momentum and teacher-temperature schedules).
        crop: crop size (32 CPU scale-down, 64 paper); a multiple of 32.
        matcher: ``matcher(a, b, point_in_a) -> (point_in_b, score)`` between volumes ``a`` and
            ``b`` (indices into ``volumes``; points are voxel indices ``k, j, i``). None: same-volume views.
        view_mode: see :class:`ViewMode`.
        min_score, retries: mining threshold and tries (0.7, 100).
        mask_block, mask_ratio, mask_columns: :func:`block_mask` settings (scale-down 8; 0.75; columns).
        feature_size, depths, num_heads, window_size, embedding_dim: :class:`AliceNet`.
        head_hidden, head_bottleneck, out_dim: :class:`AliceHead` (scale-down 256, 64, 128).
        cafa_heads, cafa_dim_head, cafa_dropout: :class:`CAFA` (scale-down 2 x 64).
        use_cafa, use_generative, rec_region, w_rec: :class:`AliceLoss` and ablations.
        cafa_keys: ``"same"`` or ``"matched"`` (:class:`CafaKeys`).
        tau_s, tau_t_start, tau_t_end, tau_t_warmup_steps: temperatures (warm-up default 3 % of ``steps``,
            Alice's 30 of 1000 epochs).
        momentum_base: EMA momentum at step 0 (0.996, cosine to 1).
        freeze_last_layer_steps: steps during which the prototype layers get no gradient (Alice: 1 epoch).
        export_source: ``"teacher"`` (default) or ``"student"``: the network :meth:`export_state` caches.
        manifest: extra manifest fields (``spacing``, ``intensity``, ``data_fingerprint``, ...).
    """

    method = "alice"
    architecture = "alice_swin3d"

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        steps: int,
        crop: int = 32,
        matcher: Callable[[int, int, np.ndarray], tuple[np.ndarray, float]] | None = None,
        view_mode: ViewMode | str = ViewMode.MINED,
        min_score: float = 0.7,
        retries: int = 100,
        body_threshold: float = 0.0,
        mask_block: int = 8,
        mask_ratio: float = 0.75,
        mask_columns: bool = True,
        feature_size: int = 12,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 4,
        embedding_dim: int = 32,
        head_hidden: int = 256,
        head_bottleneck: int = 64,
        out_dim: int = 128,
        cafa_heads: int = 2,
        cafa_dim_head: int = 64,
        cafa_dropout: float = 0.1,
        use_cafa: bool = True,
        use_generative: bool = True,
        rec_region: RecRegion | str = RecRegion.ALL,
        w_rec: float = 10.0,
        cafa_keys: CafaKeys | str = CafaKeys.SAME,
        tau_s: float = 0.1,
        tau_t_start: float = 0.008,
        tau_t_end: float = 0.01,
        tau_t_warmup_steps: int | None = None,
        momentum_base: float = 0.996,
        freeze_last_layer_steps: int = 0,
        export_source: str = "teacher",
        manifest: Mapping[str, Any] | None = None,
    ) -> None:
        self.volumes = [np.asarray(v, dtype=np.float32) for v in volumes]
        if not self.volumes or any(v.ndim != 3 for v in self.volumes):
            raise InputError(
                f"AliceTask volumes: expected one or more 3D arrays, got shapes {[np.shape(v) for v in volumes]}"
            )
        if int(steps) < 1:
            raise InputError(f"AliceTask steps: expected a positive integer, got {steps!r}")
        if export_source not in ("teacher", "student"):
            raise InputError(f"AliceTask export_source: expected 'teacher' or 'student', got {export_source!r}")
        self.steps = int(steps)
        self.crop = int(crop)
        self.matcher = matcher
        self.view_mode = _enum(ViewMode, view_mode, "AliceTask view_mode")
        self.min_score, self.retries, self.body_threshold = float(min_score), int(retries), float(body_threshold)
        self.mask_block, self.mask_ratio, self.mask_columns = int(mask_block), float(mask_ratio), bool(mask_columns)
        block_mask((self.crop,) * 3, self.mask_block, self.mask_ratio)  # validates sizes
        self.net_params: dict[str, Any] = {
            "img_size": self.crop,
            "in_channels": 1,
            "feature_size": int(feature_size),
            "depths": [int(d) for d in depths],
            "num_heads": [int(h) for h in num_heads],
            "window_size": int(window_size),
            "embedding_dim": int(embedding_dim),
            "embed_seed": 0,
            "norm_name": resolve_norm("auto", self.crop),
        }
        self.head_params = {"hidden": int(head_hidden), "bottleneck": int(head_bottleneck), "out_dim": int(out_dim)}
        self.cafa_params = {"heads": int(cafa_heads), "dim_head": int(cafa_dim_head), "dropout": float(cafa_dropout)}
        self.loss_params = {
            "tau_s": float(tau_s), "use_cafa": bool(use_cafa), "use_generative": bool(use_generative),
            "rec_region": _enum(RecRegion, rec_region, "AliceTask rec_region").value, "w_rec": float(w_rec),
        }
        self.cafa_keys = _enum(CafaKeys, cafa_keys, "AliceTask cafa_keys")
        self.tau_t = (float(tau_t_start), float(tau_t_end))
        self.tau_t_warmup = int(round(0.03 * self.steps)) if tau_t_warmup_steps is None else int(tau_t_warmup_steps)
        self.momentum_base = float(momentum_base)
        self.freeze_last_layer_steps = int(freeze_last_layer_steps)
        self.export_source = export_source
        self.manifest = dict(manifest or {})

    # ----------------------------------------------------------------------------- model
    def build_model(self) -> AliceModel:
        """A fresh :class:`AliceModel` (student = teacher at step 0)."""
        model = AliceModel(self.net_params, self.head_params, self.cafa_params, self.loss_params, self.cafa_keys)
        if self.freeze_last_layer_steps > 0:
            limit = self.freeze_last_layer_steps

            def gate(grad: Tensor, _m: AliceModel = model) -> Tensor:
                # loss_calls was incremented before backward: the step being taken is loss_calls - 1.
                return torch.zeros_like(grad) if int(_m.loss_calls) <= limit else grad

            for p in model.prototype_parameters():
                if p.requires_grad:
                    p.register_hook(gate)
        return model

    def momentum(self, update_index: int) -> float:
        """EMA momentum of the update following optimizer step ``update_index`` (0-based)."""
        return momentum_schedule(update_index, self.steps, self.momentum_base)

    def temperature(self, step: int) -> float:
        """Teacher temperature at 0-based ``step``."""
        return teacher_temperature(step, self.tau_t_warmup, *self.tau_t)

    # ----------------------------------------------------------------------------- data
    def _pair(self, rng: np.random.Generator) -> MinedViews:
        n = len(self.volumes)
        a = int(rng.integers(n))
        mode = self.view_mode
        if mode is ViewMode.MINED and (self.matcher is None or n < 2):
            mode = ViewMode.SAME
        if mode is ViewMode.SAME:
            return mine_views(self.volumes[a], None, self.crop, rng=rng, body_threshold=self.body_threshold)
        b = int(rng.integers(n - 1)) if n > 1 else 0
        b = b + 1 if n > 1 and b >= a else b
        if mode is ViewMode.RANDOM:
            pb = _random_body_point(self.volumes[b], rng, self.body_threshold)

            def matcher(_p: np.ndarray) -> tuple[np.ndarray, float]:
                return pb.astype(float), 0.0

            return mine_views(self.volumes[a], self.volumes[b], self.crop, matcher, rng, min_score=-np.inf,
                              retries=1, body_threshold=self.body_threshold)
        fn = self.matcher
        assert fn is not None
        return mine_views(
            self.volumes[a], self.volumes[b], self.crop, lambda p: fn(a, b, p), rng,
            self.min_score, self.retries, self.body_threshold,
        )

    def make_batch(
        self, step: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1, batch_size: int = 1
    ) -> dict[str, Tensor]:
        """This rank's rows of the global batch of ``step``: ``q``, ``k`` (``b, 1, S, S, S``),
        ``mask_q``, ``mask_k`` (``b, 1, S, S, S``, 1 = masked), ``centre_q``, ``centre_k`` (``b, 3``
        voxel indices), ``score`` (``b``)."""
        from ..engine import batch_shard

        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        pairs = [self._pair(rng) for _ in range(int(batch_size))]
        shape = (self.crop,) * 3
        mask_q = block_masks(batch_size, shape, self.mask_block, self.mask_ratio, generator, self.mask_columns)
        mask_k = block_masks(batch_size, shape, self.mask_block, self.mask_ratio, generator, self.mask_columns)
        sl = batch_shard(int(batch_size), rank, world_size)
        pairs = pairs[sl]
        return {
            "q": torch.from_numpy(np.stack([p.q for p in pairs])[:, None]),
            "k": torch.from_numpy(np.stack([p.k for p in pairs])[:, None]),
            "mask_q": mask_q[sl],
            "mask_k": mask_k[sl],
            "centre_q": torch.tensor(np.stack([p.centre_q for p in pairs]), dtype=torch.float32),
            "centre_k": torch.tensor(np.stack([p.centre_k for p in pairs]), dtype=torch.float32),
            "score": torch.tensor([p.score for p in pairs], dtype=torch.float32),
        }

    # ----------------------------------------------------------------------------- loss
    def after_step(self, model: nn.Module, step: int | None = None) -> None:
        """Post-optimizer-step hook: the EMA update of the teacher (idempotent with :meth:`loss`'s catch-up)."""
        from ..engine import unwrap_model

        core = unwrap_model(model)
        assert isinstance(core, AliceModel)
        core.catch_up_ema(self.momentum)

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Scalar Alice loss (mean over the batch) and float logs (``cls``, ``patch``, ``rec``, ``tau_t``, ``momentum``)."""
        from ..engine import unwrap_model

        core = unwrap_model(model)
        if not isinstance(core, AliceModel):
            raise InputError(f"AliceTask.loss: expected an AliceModel, got {type(core).__name__}")
        core.catch_up_ema(self.momentum)
        step = int(core.loss_calls)
        tau_t = self.temperature(step)
        terms = model(batch["q"], batch["k"], batch.get("mask_q"), batch.get("mask_k"), tau_t)
        if core.training:
            core.loss_calls += 1
        metrics = {name: float(terms[name]) for name in ("cls", "patch", "rec")}
        metrics.update(tau_t=tau_t, momentum=self.momentum(step))
        if "score" in batch:
            metrics["view_score"] = float(batch["score"].float().mean())
        return terms["loss"], metrics

    # ----------------------------------------------------------------------------- export
    def export_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The cached encoder: the teacher's (or student's) :class:`AliceNet` state, EMA up to date."""
        from ..engine import unwrap_model

        core = unwrap_model(model)
        assert isinstance(core, AliceModel)
        core.catch_up_ema(self.momentum)
        net = core.teacher if self.export_source == "teacher" else core.student
        return {k: v.detach() for k, v in net.state_dict().items()}

    def manifest_fields(self) -> dict[str, Any]:
        """Cache-manifest fields (method, architecture + params, embedding_dim, ...) plus ``manifest``."""
        fields: dict[str, Any] = {
            "method": self.method,
            "architecture": self.architecture,
            "architecture_params": dict(self.net_params),
            "embedding_dim": self.net_params["embedding_dim"],
            "spatial_dims": 3,
            "spacing": None,
            "intensity": {},
            "data_fingerprint": "",
        }
        fields.update(self.manifest)
        fields.setdefault(
            "description",
            f"Alice ({self.view_mode.value} views, crop {self.crop}, CAFA {'on' if self.loss_params['use_cafa'] else 'off'}, "
            f"generative {'on' if self.loss_params['use_generative'] else 'off'}), {self.export_source} exported",
        )
        return fields
