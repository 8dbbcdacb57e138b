"""A small real training task for the engine tests: denoising 3D patches of a real brain MRI.

The volume is the MNI 2009c T1w of the ``autoafids`` wheel (DATA.md section 1.1), read with
SimpleITK, shrunk 4x (4 mm voxels, 49x58x49) and scaled to [0, 1] by its 99.5th percentile.
Step ``s`` takes ``batch_size`` 12^3 patches centred on head voxels and adds Gaussian noise, all
drawn from the engine's per-step generator, so batches depend on (seed, step) only; each rank
keeps its rows of the global batch. The network is a tiny conv encoder-decoder without
BatchNorm (so that one process and two DDP processes give the same loss curve).

Run as a script it trains and prints JSON-lines progress (used by the subprocess, kill, cancel
and torchrun tests)::

    python Testing/helpers_engine.py --steps 20 --checkpoint-dir /tmp/ck --out result.json
    torchrun --standalone --nproc_per_node=2 Testing/helpers_engine.py --steps 10 --out r.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from AnatSSLLib.engine import CancelToken, TrainingConfig, batch_shard, train
from AnatSSLLib.progress import JsonLinesProgress

PATCH = 12
SHRINK = 4
T1_NAME = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"


def t1_path() -> Path:
    """Path of the 2009c T1w NIfTI shipped in the autoafids wheel."""
    import importlib.util

    spec = importlib.util.find_spec("autoafids")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the autoafids data wheel is not installed (pip install --no-deps autoafids==0.1.4)")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / T1_NAME


@functools.lru_cache(maxsize=1)
def load_volume() -> tuple[torch.Tensor, torch.Tensor, str]:
    """(volume (Z,Y,X) float32 in [0,~1], head-voxel patch corners (N,3) int64, fingerprint)."""
    import SimpleITK as sitk

    path = t1_path()
    img = sitk.BinShrink(sitk.ReadImage(str(path), sitk.sitkFloat32), [SHRINK] * 3)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr /= np.percentile(arr, 99.5)
    # Corners whose patch lies inside the volume and whose centre is in the head.
    lim = np.array(arr.shape) - PATCH
    centre = arr[PATCH // 2 : PATCH // 2 + lim[0] + 1, PATCH // 2 : PATCH // 2 + lim[1] + 1,
                 PATCH // 2 : PATCH // 2 + lim[2] + 1]
    corners = np.argwhere(centre > 0.3)
    digest = hashlib.sha256(f"{T1_NAME}:{path.stat().st_size}:shrink{SHRINK}".encode()).hexdigest()
    return torch.from_numpy(arr), torch.from_numpy(corners.astype(np.int64)), digest[:16]


class TinyDAE(nn.Module):
    """Conv encoder (1 -> 8 channels, /2) and decoder back to 1 channel; no normalisation layers.

    ``unused_head`` gets no gradient, as LD's cluster head in its "pd" stage.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv3d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose3d(width, width, 2, stride=2), nn.ReLU(),
            nn.Conv3d(width, 1, 3, padding=1),
        )
        # Trained by no loss here (like LD's cluster head in its "pd" stage): DDP must cope.
        self.unused_head = nn.Conv3d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DenoiseTask:
    """Denoising of real T1w patches: a real, small :class:`AnatSSLLib.engine.TrainingTask`."""

    def __init__(self, noise: float = 0.2, width: int = 8) -> None:
        self.noise = noise
        self.width = width
        self.volume, self.corners, self.fingerprint = load_volume()

    def build_model(self) -> nn.Module:
        return TinyDAE(self.width)

    def make_batch(self, step: int, generator: torch.Generator, *, rank: int, world_size: int,
                   batch_size: int) -> dict[str, torch.Tensor]:
        pick = torch.randint(len(self.corners), (batch_size,), generator=generator)
        noise = torch.randn((batch_size, 1, PATCH, PATCH, PATCH), generator=generator) * self.noise
        rows = batch_shard(batch_size, rank, world_size)
        clean = torch.stack([
            self.volume[z : z + PATCH, y : y + PATCH, x : x + PATCH]
            for z, y, x in self.corners[pick[rows]].tolist()
        ])[:, None]
        return {"noisy": clean + noise[rows], "clean": clean}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["noisy"])
        loss = torch.mean((out - batch["clean"]) ** 2)
        return loss, {"mse": float(loss.detach())}

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "method": "test_denoise",
            "architecture": "tiny_dae3d",
            "architecture_params": {"width": self.width},
            "embedding_dim": self.width,
            "spatial_dims": 3,
            "spacing": [float(SHRINK)] * 3,
            "intensity": {"kind": "percentile_scale", "upper": 99.5},
            "data_fingerprint": self.fingerprint,
        }

    def export_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}


class FailingTask(DenoiseTask):
    """:class:`DenoiseTask` whose loss raises on one rank at one step (a rank that fails mid-run)."""

    def __init__(self, rank: int, step: int) -> None:
        super().__init__()
        self.fail_rank, self.fail_step, self.calls = rank, step, 0

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        if self.calls == self.fail_step and int(os.environ.get("RANK", "0")) == self.fail_rank:
            raise ValueError(f"planted failure on rank {self.fail_rank} at step {self.fail_step}")
        return super().loss(model, batch)


def small_config(**overrides: Any) -> TrainingConfig:
    """The test config: Adam 3e-3, batch 4, constant lr, seed 7."""
    kwargs: dict[str, Any] = dict(steps=20, batch_size=4, lr=3e-3, seed=7, log_every=1,
                                  checkpoint_every=0, device="cpu")
    kwargs.update(overrides)
    return TrainingConfig(**kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--cancel-file")
    p.add_argument("--signals", action="store_true", help="SIGTERM/SIGINT cancel the run")
    p.add_argument("--cancel-at", type=int, help="cancel (on rank 0 only) after this step")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per progress event")
    p.add_argument("--out", help="write the result (rank 0) as JSON here")
    p.add_argument("--fail-at", metavar="RANK:STEP", help="raise an error on this rank in the loss of this 1-based step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    config = small_config(steps=args.steps, batch_size=args.batch_size, checkpoint_dir=args.checkpoint_dir,
                          checkpoint_every=args.checkpoint_every)
    sink = JsonLinesProgress(sys.stdout)
    token = CancelToken(args.cancel_file)

    def progress(event: dict[str, Any]) -> None:  # called on rank 0 only
        sink(event)
        if args.cancel_at is not None and event["event"] == "progress" and event["step"] == args.cancel_at:
            token.cancel(f"asked at step {args.cancel_at}")
        if args.sleep and event["event"] == "progress":
            time.sleep(args.sleep)

    task = DenoiseTask()
    if args.fail_at:
        task = FailingTask(*map(int, args.fail_at.split(":")))
    if args.signals:
        with token.handle_signals():
            result = train(task, config, progress=progress, cancel=token)
    else:
        result = train(task, config, progress=progress, cancel=token)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as fh:
            json.dump({"losses": result.losses, "steps_done": result.steps_done, "cancelled": result.cancelled,
                       "resumed_from": result.resumed_from}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
