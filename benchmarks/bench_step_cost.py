"""Cost of one pretraining step against a bare MONAI network step, measured in the same run.

- LD (defaults of ``anatssl pretrain --method ld``: batch 2 pairs, 32^3 crops at 2 mm, paired
  contrasts, the paper's view augmentation; stage "ld") against a bare MONAI ``UNet`` (0.65 M
  parameters: channels 16-32-64-128, strides 2, one residual unit, 32 outputs) on a batch of 2
  crops of 64^3, forward + backward + AdamW.
- Alice (defaults of ``anatssl pretrain --method alice``: batch 2, 32^3 crops, CAFA and the
  generative term on) against a bare MONAI ``SwinUNETR`` of the same configuration (feature size
  12, group norm) on 2 crops of 64^3, forward + backward + AdamW.

The steps are timed alternately, round after round (so that a machine shared with other work
slows both alike), and the medians reported. LD's step is also split into its parts (batch:
sampling, augmentation and view pairing; forward; loss: clustering and the losses; backward;
optimizer). Cost per voxel = seconds per step / voxels through the trained network per step:
LD's 5 views per pair (A1, B1, A2, B2 and the mixed view: 10 crops of 32^3), Alice's two views
per sample through the student (4 crops; the teacher's no-grad forward is part of its step cost).
The issue that asked for this counted LD's 4 crops (A and B of two pairs); that ratio is given too.
``conv_macs_per_voxel`` is the multiply-accumulates of the 3D convolutions per input voxel, from
their output shapes: what the network itself costs, independent of the machine.

    python benchmarks/bench_step_cost.py --population POP --rounds 4 --threads 1 \\
        --out benchmarks/results/step_cost.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def conv_macs_per_voxel(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    total = [0]

    def hook(mod, _inp, out):
        total[0] += out.numel() // out.shape[0] * mod.in_channels // mod.groups * int(np.prod(mod.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    n, voxels = inputs[0].shape[0], int(np.prod(inputs[0].shape[2:]))
    return total[0] * n / (n * voxels)


def ld_setup(population: str):
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.datasets import VolumeCrops
    from AnatSSLLib.encoders import DEFAULT_INTENSITY
    from AnatSSLLib.methods.ld import LDTask
    from AnatSSLLib.pretraining import LDPretrainSettings, _augment

    pop = load_population(population)
    subjects = [[s.image(c) for c in ("t1", "t2") if c in s.contrasts] for s in pop.subjects]
    st = LDPretrainSettings()
    data = VolumeCrops(subjects, spacing=(st.spacing_mm,) * 3, crop_size=st.crop_size, intensity=DEFAULT_INTENSITY)
    task = LDTask(spatial_dims=3, stage="ld", grid=st.grid, num_clusters=st.num_clusters, embedding_dim=st.embedding_dim,
                  sampler=data.torch_sampler(2), paired_contrasts=True, manifest={}, augment=_augment(st))
    model = task.build_model()
    return task, model, torch.optim.Adam(model.parameters(), lr=st.lr), st.batch_size


def ld_step(state, step: int) -> dict[str, float]:
    from AnatSSLLib.engine import step_generator
    from AnatSSLLib.methods.ld import LDViews

    task, model, opt, batch = state
    t = [time.perf_counter()]
    views = LDViews.from_any(task.make_batch(step, step_generator(0, step), rank=0, world_size=1, batch_size=batch))
    t.append(time.perf_counter())
    emb, asg = model(views.images)
    t.append(time.perf_counter())
    loss, _ = task.loss_fn(emb, asg, views, task.stage)
    t.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t.append(time.perf_counter())
    opt.step()
    t.append(time.perf_counter())
    parts = dict(zip(("batch", "forward", "loss", "backward", "optimizer"), np.diff(t)))
    parts["voxels"] = float(views.images[:, :1].numel())
    return parts


def alice_setup(population: str):
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.datasets import VolumeCrops
    from AnatSSLLib.encoders import DEFAULT_INTENSITY
    from AnatSSLLib.methods.alice import AliceTask

    pop = load_population(population)
    data = VolumeCrops([[s.image("t1")] for s in pop.subjects], spacing=(2.0,) * 3, crop_size=32,
                       intensity=DEFAULT_INTENSITY)
    task = AliceTask([arr[0] for arr in data.subjects], steps=1000, crop=32, view_mode="same", body_threshold=0.1)
    model = task.build_model()
    return task, model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                          weight_decay=0.04), 2


def alice_step(state, step: int) -> dict[str, float]:
    from AnatSSLLib.engine import step_generator

    task, model, opt, batch = state
    t0 = time.perf_counter()
    b = task.make_batch(step, step_generator(0, step), rank=0, world_size=1, batch_size=batch)
    t1 = time.perf_counter()
    loss, _ = task.loss(model, b)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    task.after_step(model, step + 1)
    t2 = time.perf_counter()
    return {"batch": t1 - t0, "compute": t2 - t1, "voxels": float(b["q"].numel() + b["k"].numel())}


def bare_setup(kind: str):
    from monai.networks.nets import SwinUNETR, UNet

    if kind == "unet":
        net = UNet(spatial_dims=3, in_channels=1, out_channels=32, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                   num_res_units=1)
    else:
        from AnatSSLLib.networks.alice_net import swinunetr_kwargs

        net = SwinUNETR(**swinunetr_kwargs(feature_size=12, norm_name=("group", {"num_groups": 4})))
    x = torch.rand(2, 1, 64, 64, 64)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-3), x


def bare_step(state, step: int) -> dict[str, float]:
    net, opt, x = state
    t0 = time.perf_counter()
    out = net(x)
    loss = out.float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"compute": time.perf_counter() - t0, "voxels": float(x.numel())}


def median(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", required=True, help="a population folder (anatssl data synth) with t1 and t2")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (one step of each network per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    p.add_argument("--skip-alice", action="store_true")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = {"ld": (ld_setup(args.population), ld_step), "unet": (bare_setup("unet"), bare_step)}
    if not args.skip_alice:
        cases["alice"] = (alice_setup(args.population), alice_step)
        cases["swinunetr"] = (bare_setup("swin"), bare_step)
    rows: dict[str, list[dict]] = {k: [] for k in cases}
    for r in range(args.warmup + args.rounds):
        for name, (state, fn) in cases.items():
            out = fn(state, r)
            out["total"] = sum(v for k, v in out.items() if k != "voxels")
            if r >= args.warmup:
                rows[name].append(out)

    def summary(name: str, params_of) -> dict:
        s = {"s_per_step": median(rows[name], "total"), "voxels_per_step": rows[name][0]["voxels"],
             "params_m": round(sum(p.numel() for p in params_of.parameters()) / 1e6, 3),
             "steps_timed": [round(r["total"], 3) for r in rows[name]]}
        s["us_per_voxel"] = 1e6 * s["s_per_step"] / s["voxels_per_step"]
        s["parts_s"] = {k: median(rows[name], k) for k in rows[name][0] if k not in ("voxels", "total")}
        return s

    ld_model, unet = cases["ld"][0][1], cases["unet"][0][0]
    report: dict = {
        "benchmark": "step_cost",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent).stdout.strip(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "load_average": list(os.getloadavg())},
        "ld": summary("ld", ld_model), "unet": summary("unet", unet),
    }
    crop = 32**3
    report["ld"]["conv_macs_per_voxel"] = conv_macs_per_voxel(ld_model, torch.rand(2, 1, 32, 32, 32))
    report["unet"]["conv_macs_per_voxel"] = conv_macs_per_voxel(unet, torch.rand(1, 1, 64, 64, 64))
    report["ld_vs_unet_per_voxel"] = report["ld"]["us_per_voxel"] / report["unet"]["us_per_voxel"]
    report["ld_vs_unet_per_voxel_4_crops"] = (report["ld"]["s_per_step"] / (4 * crop)) / (
        report["unet"]["s_per_step"] / report["unet"]["voxels_per_step"])
    report["ld_vs_unet_conv_macs_per_voxel"] = report["ld"]["conv_macs_per_voxel"] / report["unet"]["conv_macs_per_voxel"]
    if not args.skip_alice:
        report["alice"] = summary("alice", cases["alice"][0][1])
        report["swinunetr"] = summary("swinunetr", cases["swinunetr"][0][0])
        report["alice_vs_swinunetr_per_voxel"] = report["alice"]["us_per_voxel"] / report["swinunetr"]["us_per_voxel"]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
