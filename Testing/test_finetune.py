"""`anatssl finetune`: a segmentation network initialised from an encoder, trained on one labelled subject."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from AnatSSLLib.cli import main
from AnatSSLLib.errors import InputError
from AnatSSLLib.image import read_image, write_image
from AnatSSLLib.networks.segmenter import build_segmenter, init_segmenter_from_encoder
from AnatSSLLib.metrics import dice_per_label

TISSUE = (1, 2, 3)  # csf, gm, wm


def _path(subject, stem: str) -> str:
    return str(subject.folder / f"{stem}.nii.gz")


def _tissue_labels(subject, folder) -> str:
    """The subject's labels merged into csf (1), grey matter (2) and white matter (3): a user's tissue map."""
    lab = subject.labels()
    merged = np.zeros_like(lab.array)
    for source, tissue in ((1, 1), (4, 1), (5, 1), (6, 1), (7, 1), (2, 2), (22, 2), (3, 3), (23, 3)):
        merged[lab.array == source] = tissue
    merged[(lab.array >= 8) & (lab.array <= 19)] = 2  # deep grey matter
    return str(write_image(lab.with_array(merged), folder / f"{subject.name}_tissue.nii.gz"))


def test_finetune_cli_learns_tissue_from_one_subject_and_reuses_the_network(population_small, tmp_path):
    train, test = population_small.subjects[0], population_small.subjects[1]
    out = tmp_path / "ft"
    args = ["finetune", "--images", _path(train, "t1"), "--labels", _tissue_labels(train, tmp_path),
            "--targets", _path(test, "t1"), "--out", str(out), "--steps", "100", "--crop", "32",
            "--device", "cpu", "--progress", "none", "--seed", "0"]
    assert main(args) == 0
    meta = json.loads((out / "segmenter.json").read_text())
    assert meta["info"]["init"] == "encoder" and meta["info"]["weights_loaded"] > 0 and meta["label_values"][0] == 0
    pred = read_image(out / "t1_labels.nii.gz")
    truth = read_image(_tissue_labels(test, tmp_path))
    assert pred.same_geometry(truth)  # the label map comes back on the target's own grid
    dice = dice_per_label(pred, truth, TISSUE)
    # 100 steps on one low-resolution subject (3.4-5 mm voxels): far from converged, well above chance (0)
    assert dice[3] > 0.5 and np.mean(list(dice.values())) > 0.3, dice
    # the saved network gives the same answer without training again
    again = tmp_path / "again"
    assert main(["finetune", "--segmenter", str(out), "--targets", _path(test, "t1"), "--out", str(again),
                 "--device", "cpu"]) == 0
    assert np.array_equal(read_image(next(again.glob("*_labels.nii.gz"))).array, pred.array)


def test_finetune_cli_bad_input(population_small, tmp_path, capsys):
    s = population_small.subjects[0]
    out = tmp_path / "bad"
    assert main(["finetune", "--images", _path(s, "t1"), _path(s, "t2"), "--labels", _path(s, "labels"),
                 "--out", str(out), "--device", "cpu"]) != 0
    assert "one label map per image" in capsys.readouterr().err
    assert main(["finetune", "--images", _path(s, "t1"), "--labels", _path(s, "labels"), "--crop", "40",
                 "--out", str(out), "--device", "cpu"]) != 0
    assert "multiple of 16" in capsys.readouterr().err
    other = population_small.subjects[1]  # labels of another subject: another grid
    assert main(["finetune", "--images", _path(s, "t1"), "--labels", _path(other, "labels"),
                 "--out", str(out), "--device", "cpu", "--steps", "1"]) != 0
    assert "grid" in capsys.readouterr().err
    assert main(["finetune", "--segmenter", str(tmp_path / "none"), "--targets", _path(s, "t1"), _path(s, "t1"),
                 "--out", str(out)]) != 0
    assert "would write the same output file" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    with pytest.raises(InputError, match="cannot initialise a segmentation network"):
        build_segmenter("awcl_resnet2d", {}, 4)


def test_alice_weights_initialise_swinunetr():
    from AnatSSLLib.networks.alice_net import build_alice_net

    params = dict(feature_size=12, img_size=32, embedding_dim=16)
    torch.manual_seed(0)
    alice = build_alice_net(**params)
    net = build_segmenter("alice_swin3d", alice.config(), num_classes=5)
    loaded = init_segmenter_from_encoder(net, "alice_swin3d", alice.state_dict())
    assert loaded and all(not k.startswith("out.") for k in loaded)
    own = net.state_dict()
    for key in loaded:
        assert torch.equal(own[key], alice.state_dict()["unetr." + key])
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 5, 32, 32, 32)


def test_finetune_refuses_2d_images_and_a_2d_encoder(population_small):
    from AnatSSLLib.encoders import LoadedEncoder, load_encoder
    from AnatSSLLib.image import Image
    from AnatSSLLib.tools.finetune import FinetuneSettings, finetune

    encoder = load_encoder(None, device="cpu")
    plane = Image(np.ones((32, 32), np.float32), (1.0, 1.0), (0.0, 0.0), np.eye(2), "plane")
    with pytest.raises(InputError, match="3D"):
        finetune(encoder, [plane], [plane.with_array(np.ones((32, 32), np.int32))], FinetuneSettings(steps=1, device="cpu"))
    manifest = dataclasses.replace(encoder.manifest, architecture="awcl_resnet2d", spatial_dims=2)
    awcl_like = LoadedEncoder("awcl-test", manifest, encoder.model, encoder.device)
    s = population_small.subjects[0]
    with pytest.raises(InputError, match="cannot initialise a segmentation network"):
        finetune(awcl_like, [s.image("t1")], [s.labels()], FinetuneSettings(steps=1, device="cpu"))
