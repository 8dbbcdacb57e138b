"""The on-disk embedding index: exact and HNSW search, persistence, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.index import EmbeddingIndex, IndexedVolume


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _filled(kind="exact", n_vol=3, per=500, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    index = EmbeddingIndex("ld-test", dim, kind=kind)
    data = {}
    for v in range(n_vol):
        vec, pos = _unit(rng, per, dim), rng.uniform(-50, 50, (per, 3))
        index.add_volume(IndexedVolume(f"vol{v}", f"/data/vol{v}.nii.gz", f"key{v}", 0), vec, pos)
        data[f"vol{v}"] = (vec, pos)
    return index, data


def test_exact_search_returns_the_stored_vector_and_its_position():
    index, data = _filled()
    vec, pos = data["vol1"]
    hits = index.search(vec[42], k=5)
    assert hits[0].volume == "vol1"
    np.testing.assert_allclose(hits[0].position, pos[42], atol=1e-4)
    assert hits[0].score == pytest.approx(1.0, abs=2e-3)  # vectors are stored as float16
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_one_per_volume_and_exclusion():
    index, data = _filled()
    hits = index.search(data["vol0"][0][3], k=3, one_per_volume=True)
    assert sorted(h.volume for h in hits) == ["vol0", "vol1", "vol2"]
    hits = index.search(data["vol0"][0][3], k=3, one_per_volume=True, exclude_volumes=["vol0"])
    assert {h.volume for h in hits} == {"vol1", "vol2"}


def test_hnsw_recall_against_exact():
    rng = np.random.default_rng(1)
    exact, data = _filled("exact", n_vol=4, per=2000, dim=32, seed=3)
    hnsw, _ = _filled("hnsw", n_vol=4, per=2000, dim=32, seed=3)
    assert hnsw.effective_kind == "hnsw" and exact.effective_kind == "exact"
    queries = _unit(rng, 50, 32)
    _, truth = exact.search_vectors(queries, 10)
    _, found = hnsw.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)])
    assert recall >= 0.95


def test_auto_switches_to_hnsw_past_the_threshold():
    index = EmbeddingIndex("ld-test", 8, approximate_threshold=100)
    rng = np.random.default_rng(0)
    index.add_volume(IndexedVolume("a", "", "", 0), _unit(rng, 50, 8), np.zeros((50, 3)))
    assert index.effective_kind == "exact"
    index.add_volume(IndexedVolume("b", "", "", 0), _unit(rng, 80, 8), np.zeros((80, 3)))
    assert index.effective_kind == "hnsw"


def test_save_open_round_trip_add_and_remove(tmp_path):
    index, data = _filled()
    index.save(tmp_path / "idx")
    again = EmbeddingIndex.open(tmp_path / "idx")
    assert again.volume_names() == ["vol0", "vol1", "vol2"] and len(again) == 1500
    hit = again.search(data["vol2"][0][7], k=1)[0]
    assert hit.volume == "vol2" and hit.path == "/data/vol2.nii.gz"
    again.remove_volume("vol1")
    again.save(tmp_path / "idx")
    third = EmbeddingIndex.open(tmp_path / "idx")
    assert third.volume_names() == ["vol0", "vol2"] and len(third) == 1000
    hit = third.search(data["vol2"][0][7], k=1)[0]
    assert hit.volume == "vol2"
    np.testing.assert_allclose(hit.position, data["vol2"][1][7], atol=1e-4)
    assert len(list((tmp_path / "idx").glob("gen-*"))) == 1  # old generations are cleaned up
    vs = third.search_volumes(data["vol0"][0].mean(axis=0), k=2)
    assert vs[0].volume == "vol0"


def test_interrupted_save_keeps_the_previous_index(tmp_path, monkeypatch):
    from AnatSSLLib import index as index_module

    index, data = _filled()
    index.save(tmp_path / "idx")
    rng = np.random.default_rng(5)
    index.add_volume(IndexedVolume("vol3", "", "", 0), _unit(rng, 10, 16), np.zeros((10, 3)))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "_digest", boom)  # fails after the arrays are written
    with pytest.raises(OSError):
        index.save(tmp_path / "idx")
    monkeypatch.undo()
    kept = EmbeddingIndex.open(tmp_path / "idx")
    assert kept.volume_names() == ["vol0", "vol1", "vol2"]
    assert not list((tmp_path / "idx").glob(".gen-*"))


def test_refuses_to_mix_encoders(tmp_path):
    index, _ = _filled()
    index.save(tmp_path / "idx")
    other = EmbeddingIndex("ld-other", 16)
    other.add_volume(IndexedVolume("x", "", "", 0), np.eye(16, dtype=np.float32)[:2], np.zeros((2, 3)))
    with pytest.raises(InputError, match="ld-test"):
        other.save(tmp_path / "idx")
    with pytest.raises(InputError, match="already holds an index of encoder ld-test"):
        EmbeddingIndex.create(tmp_path / "idx", "ld-other", 16)


def test_bad_input(tmp_path):
    index = EmbeddingIndex("ld-test", 16)
    with pytest.raises(InputError, match="empty"):
        index.search(np.ones(16), k=3)
    with pytest.raises(InputError, match="dimension 16"):
        index.add_volume(IndexedVolume("a", "", "", 0), np.ones((4, 8)), np.zeros((4, 3)))
    with pytest.raises(InputError, match="not an AnatSSL index"):
        EmbeddingIndex.open(tmp_path)
    with pytest.raises(InputError, match="kind"):
        EmbeddingIndex("x", 4, kind="ivf-magic")
    full, _ = _filled()
    with pytest.raises(InputError, match="not in the index"):
        full.remove_volume("nope")
    with pytest.raises(InputError, match="already in the index"):
        full.add_volume(IndexedVolume("vol0", "", "", 0), np.ones((1, 16)), np.zeros((1, 3)))


def test_corrupted_files_give_a_clear_error(tmp_path):
    index, _ = _filled()
    gen = index.save(tmp_path / "idx")
    (gen / "vectors.npy").write_bytes(b"garbage")
    with pytest.raises(InputError, match="altered"):
        EmbeddingIndex.open(tmp_path / "idx")
    other, _ = _filled(kind="hnsw")  # only HNSW graphs are saved (an exact index is rebuilt on first use)
    g = other.save(tmp_path / "idx3")
    faiss_file = g / "regions.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    with pytest.raises(InputError, match="regions.faiss is missing or altered"):
        EmbeddingIndex.open(tmp_path / "idx3")
    gen2 = EmbeddingIndex("ld-test", 16)
    gen2.add_volume(IndexedVolume("a", "", "", 0), np.eye(16, dtype=np.float32)[:3], np.zeros((3, 3)))
    g = gen2.save(tmp_path / "idx2")
    (g / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not an AnatSSL embedding index"):
        EmbeddingIndex.open(tmp_path / "idx2")
    g.joinpath("index.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        EmbeddingIndex.open(tmp_path / "idx2")


# ---- canonical positions --------------------------------------------------------------------
def _canonical_index(n_vol=3, seed=0):
    """Volumes on a 4 mm lattice whose canonical positions are their positions shifted per volume;
    every vector is the same but for one marked place (index 0) near the centre of each volume."""
    rng = np.random.default_rng(seed)
    axis = np.arange(-20.0, 21.0, 4.0)
    lattice = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    index = EmbeddingIndex("ld-test", 8, settings={"grid_mm": 4.0})
    index.set_reference(None, "ref")
    shifts = {}
    base = _unit(rng, 1, 8)[0]
    for v in range(n_vol):
        shift = rng.uniform(-10, 10, 3)
        vec = np.tile(base, (len(lattice), 1)) + 0.01 * rng.standard_normal((len(lattice), 8))
        index.add_volume(IndexedVolume(f"vol{v}", "", f"key{v}", 0), vec, lattice + shift, canonical=lattice)
        shifts[f"vol{v}"] = shift
    return index, base, shifts


def test_canonical_search_ranks_by_position_and_steps_off_the_lattice(tmp_path):
    index, base, shifts = _canonical_index()
    query = np.array([1.3, -2.1, 0.7])  # canonical position between lattice points
    for idx in (index, None):
        if idx is None:  # the same after a save and open (memory-mapped arrays, saved spatial table)
            index.save(tmp_path / "idx")
            idx = EmbeddingIndex.open(tmp_path / "idx")
            assert idx.has_canonical
        coarse = idx.search_canonical(base, query, k=3, local_step=False)
        fine = idx.search_canonical(base, query, k=3)
        assert sorted(h.volume for h in fine) == ["vol0", "vol1", "vol2"]  # one per volume
        for c, f in zip(coarse, fine):
            truth = query + shifts[f.volume]
            lattice_point = np.round(query / 4) * 4 + shifts[c.volume]
            np.testing.assert_allclose(c.position, lattice_point, atol=0.01)  # the nearest entry
            # the quadratic position term peaks at the query: the local step finds it off the lattice
            assert np.linalg.norm(f.position - truth) < 0.3 < np.linalg.norm(c.position - truth)
            assert f.canonical_distance_mm <= 4 * np.sqrt(3) / 2 + 1e-6
        assert [h.score for h in fine] == sorted((h.score for h in fine), reverse=True)


def test_canonical_search_radius_exclusion_and_bad_input():
    index, base, _ = _canonical_index()
    assert index.search_canonical(base, np.array([500.0, 0, 0])) == []  # outside every volume
    assert {h.volume for h in index.search_canonical(base, np.zeros(3), exclude_volumes=["vol1"])} == {"vol0", "vol2"}
    hits = index.search_canonical(base, np.zeros(3), k=5, one_per_volume=False)
    assert len(hits) == 5 and all(h.canonical_distance_mm <= 8.0 for h in hits)
    with pytest.raises(InputError, match="canonical position"):
        index.add_volume(IndexedVolume("x", "", "", 0), np.ones((2, 8)), np.zeros((2, 3)))
    plain, _ = _filled()
    with pytest.raises(InputError, match="no canonical positions"):
        plain.search_canonical(np.ones(16), np.zeros(3))


def test_large_builds_spill_to_disk_and_read_the_same(tmp_path):
    rng = np.random.default_rng(2)
    index = EmbeddingIndex("ld-test", 16, max_pending_mb=0.05)  # spill after ~50 KB
    vecs = [_unit(rng, 400, 16) for _ in range(4)]
    for v, vec in enumerate(vecs):
        index.add_volume(IndexedVolume(f"v{v}", "", "", 0), vec, rng.uniform(-5, 5, (400, 3)), canonical=rng.uniform(-5, 5, (400, 3)))
    spill = index._spill_dir
    assert spill and any(p.suffix == ".npy" for p in __import__("pathlib").Path(spill).iterdir())
    index.save(tmp_path / "idx")
    assert index._spill_dir is None and not __import__("os").path.exists(spill)
    again = EmbeddingIndex.open(tmp_path / "idx")
    np.testing.assert_allclose(np.asarray(again._vectors[800:1200], np.float32), vecs[2], atol=2e-3)
    assert again.volume_names() == ["v0", "v1", "v2", "v3"]
