"""`anatssl index` and `anatssl search` end to end on real volumes with a random-weight encoder.

With random weights many places tie, so these tests check the bookkeeping a user relies on (the
query's own volume excluded, one answer per volume, positions inside the answering volume,
incremental add and remove, refusal to mix encoders); accuracy is a benchmark matter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnatSSLLib.cli import main
from AnatSSLLib.image import Image, read_image, write_image


@pytest.fixture(scope="module")
def setup(tmp_path_factory, template_2mm):
    import torch

    from AnatSSLLib.cache import EncoderCache, EncoderManifest
    from AnatSSLLib.networks import build_network

    root = tmp_path_factory.mktemp("search")
    cache = EncoderCache(root / "cache", bundled=[])
    ids = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        manifest = EncoderManifest(method="ld", architecture="ld_unet3d", architecture_params={}, embedding_dim=32,
                                   spatial_dims=3, spacing=[4.0, 4.0, 4.0], name=f"random{seed}")
        ids.append(cache.save(build_network("ld_unet3d", {}).state_dict(), manifest))
    t1 = template_2mm.t1
    paths = []
    for n, shift in enumerate([(0.0, 0.0, 0.0), (8.0, -4.0, 4.0), (-4.0, 8.0, 0.0)]):
        (root / f"s{n}").mkdir()
        moved = Image(t1.array, t1.spacing, tuple(np.add(t1.origin, shift)), t1.direction, f"s{n}")
        paths.append(write_image(moved, root / f"s{n}" / "t1.nii.gz"))
    return root, ids, paths


def test_build_search_add_remove(setup, capsys, template_2mm):
    root, ids, paths = setup
    cache = ["--cache-dir", str(root / "cache")]
    idx = str(root / "idx")
    assert main(["index", "build", "--index", idx, "--encoder", "random0", *cache, str(paths[0]), str(paths[1])]) == 0
    capsys.readouterr()
    assert main(["index", "info", "--index", idx, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["volumes"] == ["s0/t1", "s1/t1"] and info["encoder_id"] == ids[0] and info["entries"] > 100

    assert main(["index", "add", "--index", idx, "--encoder", "random0", *cache, str(paths[2])]) == 0
    capsys.readouterr()
    ac = template_2mm.landmarks.position("AC")
    point = ",".join(f"{v:.2f}" for v in ac)
    assert main(["search", "--index", idx, "--image", str(paths[0]), "--point", point, "-k", "5", "--json", *cache]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["volume"] for h in hits] and "s0/t1" not in [h["volume"] for h in hits]  # own volume excluded
    assert len({h["volume"] for h in hits}) == len(hits) == 2  # one answer per volume
    for h in hits:
        answering = read_image(h["path"])
        assert answering.contains(np.asarray(h["position_mm"]))
    assert main(["search", "--index", idx, "--image", str(paths[0]), "--volume", "--json", *cache]) == 0
    assert {h["volume"] for h in json.loads(capsys.readouterr().out)} == {"s1/t1", "s2/t1"}

    assert main(["index", "rm", "--index", idx, "s1/t1"]) == 0
    capsys.readouterr()
    assert main(["index", "info", "--index", idx, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["volumes"] == ["s0/t1", "s2/t1"]


def test_bad_input(setup, capsys):
    root, ids, paths = setup
    cache = ["--cache-dir", str(root / "cache")]
    idx = str(root / "idx2")
    assert main(["index", "build", "--index", idx, "--encoder", "random0", *cache, str(paths[0])]) == 0
    capsys.readouterr()
    # another encoder may not add to this index
    assert main(["index", "add", "--index", idx, "--encoder", "random1", *cache, str(paths[1])]) == 2
    assert "the index was built with encoder" in capsys.readouterr().err
    # a point outside the query image
    assert main(["search", "--index", idx, "--image", str(paths[1]), "--point", "900,0,0", *cache]) == 2
    assert "outside" in capsys.readouterr().err
    # not an index
    assert main(["search", "--index", str(root), "--image", str(paths[1]), "--volume", *cache]) == 2
    assert "not an AnatSSL index" in capsys.readouterr().err


def test_many_points_in_one_run_and_negative_coordinates(setup, capsys, tmp_path, template_2mm):
    from AnatSSLLib.points import PointSet, write_points

    root, ids, paths = setup
    cache = ["--cache-dir", str(root / "cache")]
    idx = str(root / "idx-points")
    assert main(["index", "build", "--index", idx, "--encoder", "random0", *cache, *map(str, paths)]) == 0
    capsys.readouterr()
    lm = template_2mm.landmarks
    labels = ["AC", "PC", "culmen"]
    chosen = PointSet(labels=labels, positions=np.array([lm.position(n) for n in labels]))
    for name in ("q.mrk.json", "q.csv"):
        write_points(chosen, tmp_path / name, frame="RAS" if name.endswith("json") else "LPS")
        assert main(["search", "--index", idx, "--image", str(paths[0]), "--points", str(tmp_path / name),
                     "-k", "2", "--json", *cache]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["query"] for r in rows if r["rank"] == 1] == labels  # every point answered, in file order
        assert all(r["volume"] != "s0/t1" for r in rows)
    # the same point one at a time gives the batch's answer (negative LPS coordinates: the AC is at L < 0 here)
    ac = lm.position(labels[0])
    assert ac[0] < 0 or ac[1] < 0 or ac[2] < 0
    text = ",".join(f"{v:.4f}" for v in ac)
    assert main(["search", "--index", idx, "--image", str(paths[0]), "--point", text, "-k", "2", "--json", *cache]) == 0
    single = json.loads(capsys.readouterr().out)
    batch = [r for r in rows if r["query"] == labels[0]]
    assert [r["volume"] for r in single] == [r["volume"] for r in batch]
    np.testing.assert_allclose([r["position_mm"] for r in single], [r["position_mm"] for r in batch], atol=0.02)
    assert main(["search", "--index", idx, "--image", str(paths[0]), f"--point={text}", "--index-only", "--json", *cache]) == 0
    assert json.loads(capsys.readouterr().out)[0]["volume"] in {"s1/t1", "s2/t1"}


def test_negative_coordinates_are_values_not_options():
    from AnatSSLLib.cli import build_parser

    argv = ["search", "--index", "i", "--image", "x", "--point", "-0.3,2.8,-4.9", "-k", "3"]
    args = build_parser().parse_args(argv)
    assert args.point == (-0.3, 2.8, -4.9) and args.k == 3
    assert build_parser().parse_args(argv[:6] + ["-1e1,2,3"]).point == (-10.0, 2.0, 3.0)
    with pytest.raises(SystemExit):  # an option is still an option
        build_parser().parse_args(argv[:6] + ["--json"])
    # `index build` needs no --encoder: the bundled default, as in the other verbs
    assert build_parser().parse_args(["index", "build", "--index", "i", "v.nii.gz"]).encoder is None
