"""Real anatomy that ships in pip wheels, and the simulated population grown from it.

- :mod:`.packages`: locate the data wheels (autoafids, deepmriprep, spm-runtime) without importing them.
- :mod:`.templates`: the MNI152 2009c T1w/T2w template, its label map and the 32 expert AFIDs.
- :mod:`.synth`: a *simulated* population (random affine + diffeomorphic warps of the template,
  label-driven CT/PD/FLAIR-like contrasts) with exact landmark ground truth.
- :mod:`.population`: read a population folder written by :func:`synthesize_population`.
"""

from __future__ import annotations

from .packages import install_command, package_dir
from .population import Population, Subject, load_population
from .synth import CONTRASTS, synthesize_population, synthesize_subject
from .templates import LABEL_NAMES, TISSUE_OF_LABEL, Template, load_afids, load_template

__all__ = [
    "CONTRASTS",
    "LABEL_NAMES",
    "TISSUE_OF_LABEL",
    "Population",
    "Subject",
    "Template",
    "install_command",
    "load_afids",
    "load_population",
    "load_template",
    "package_dir",
    "synthesize_population",
    "synthesize_subject",
]
