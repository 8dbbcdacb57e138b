"""Which optional Python packages the tools need, which are missing, and how to install them in Slicer.

Slicer ships numpy, vtk and SimpleITK (never replaced: custom IO, ABI) and takes torch from the
PyTorch extension (``PyTorchUtils``, which picks the CUDA build for the driver); everything else
is installed with ``slicer.util.pip_install`` after the user confirms. Nothing here imports a
missing package or installs anything: the widget asks, then installs (see ``AnatSSL.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

__all__ = ["PIP_PACKAGES", "NEVER_PIP", "InstallPlan", "missing_modules", "install_plan"]

#: import name -> pip requirement, for the packages the module may install itself.
PIP_PACKAGES = {
    "monai": "monai>=1.3",
    "safetensors": "safetensors>=0.4",
    "faiss": "faiss-cpu>=1.7",
    "tqdm": "tqdm",
}
#: Packages never installed with pip inside Slicer, with the reason shown to the user.
NEVER_PIP = {
    "torch": "install it with the PyTorch extension (PyTorch Utils module), which picks the CUDA build for your GPU",
    "SimpleITK": "Slicer ships its own build with extra file readers",
    "numpy": "Slicer ships its own build; replacing it breaks compiled modules",
    "vtk": "Slicer ships its own build; another version breaks Slicer",
}


def missing_modules(names=None, find_spec: Callable = importlib.util.find_spec) -> list[str]:
    """The import names among ``names`` (default: torch and :data:`PIP_PACKAGES`) that cannot be imported."""
    names = list(names) if names is not None else ["torch", *PIP_PACKAGES]
    missing = []
    for name in names:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


@dataclasses.dataclass
class InstallPlan:
    """What to install: torch through PyTorchUtils, the rest with pip (requirements strings)."""

    torch: bool
    pip: list[str]

    @property
    def empty(self) -> bool:
        return not self.torch and not self.pip

    def describe(self) -> str:
        """A sentence for the confirmation dialog."""
        parts = []
        if self.torch:
            parts.append("PyTorch (through the PyTorch extension; a large download)")
        if self.pip:
            parts.append("the Python packages " + ", ".join(self.pip))
        if not parts:
            return "All required Python packages are installed."
        return ("AnatSSL needs " + " and ".join(parts) + ". Install now? This may take several minutes "
                "and needs an internet connection.")


def install_plan(find_spec: Callable = importlib.util.find_spec) -> InstallPlan:
    """The :class:`InstallPlan` for this Python (monai is installed after torch, which it requires)."""
    missing = missing_modules(find_spec=find_spec)
    pip = [PIP_PACKAGES[name] for name in PIP_PACKAGES if name in missing]
    for requirement in pip:
        base = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        assert base not in {n.lower() for n in NEVER_PIP}, requirement
    return InstallPlan(torch="torch" in missing, pip=pip)
