"""Named pretraining recipes: settings that were measured, offered by name instead of flags.

A :class:`Recipe` is a set of ``anatssl pretrain`` arguments (everything except the data, the
device and the name of the new encoder) with what it is for and how long it took. The Slicer
module's Advanced tab lists :data:`RECIPES` in order (the bundled default encoder's recipe first)
and shows :attr:`Recipe.expected_minutes_cpu` before a run starts.

- ``"default"``: the recipe that trained the bundled default encoder (README, "the bundled
  default encoder, reproduced"): 500 patch-discrimination and 700 region-discrimination steps with
  canonical orientation, stronger view augmentation, per-image negatives and reflect padding.
  About 1.5 mm mean landmark error on T1 targets in our benchmarks.
- ``"paper"``: LD's settings as published (the ``anatssl pretrain --method ld`` defaults: 300 + 1200
  steps, no view augmentation beyond the method's own). About 5.8 mm on T1 in the same benchmark:
  kept for comparison with the paper, not recommended for use.

The timings were measured for a 20-subject population at 2 mm on a 2-core CPU (``default``:
32 min); ``paper``'s is that per-step cost times its 1500 steps, an estimate.
"""

from __future__ import annotations

import dataclasses

from .errors import InputError

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_names"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One named pretraining recipe.

    Attributes:
        name: what ``--recipe`` and the Slicer module call it.
        method: the pretraining method (``"ld"``, ``"awcl"``, ``"alice"``).
        description: one sentence for a user choosing between recipes.
        cli_args: the ``anatssl pretrain`` arguments it stands for (``--method`` included; no
            data, device, name or progress arguments).
        expected_minutes_cpu: wall time on a 2-core CPU for a 20-subject population at 2 mm
            (minutes; a GPU is usually several times faster).
    """

    name: str
    method: str
    description: str
    cli_args: tuple[str, ...]
    expected_minutes_cpu: float

    def describe_time(self, device: str = "cpu") -> str:
        """The expected time as a sentence for ``device`` (``"cpu"``, ``"cuda"``, ``"auto"``)."""
        minutes = f"about {self.expected_minutes_cpu:.0f} min on a 2-core CPU for 20 volumes at 2 mm"
        if str(device).startswith("cuda"):
            return minutes + " (a GPU is usually several times faster; not measured here)"
        return minutes + " (longer with more or larger volumes)"


_DEFAULT = Recipe(
    name="default",
    method="ld",
    description="the recipe of the bundled default encoder (about 1.5 mm landmark error on T1 in our benchmarks)",
    cli_args=("--method", "ld", "--pd-steps", "500", "--ld-steps", "700", "--canonical-orientation",
              "--view-shift", "0.25", "--view-turn", "15", "--view-zoom", "0.1", "--view-warp", "2",
              "--pd-negatives", "image", "--view-blur", "1.2", "--view-noise", "0.05", "--padding", "reflect",
              "--seed", "0"),
    expected_minutes_cpu=32.0,
)
_PAPER = Recipe(
    name="paper",
    method="ld",
    description="LD's published settings (about 5.8 mm landmark error on T1 in our benchmarks; for comparison)",
    cli_args=("--method", "ld", "--pd-steps", "300", "--ld-steps", "1200"),
    expected_minutes_cpu=40.0,
)

#: Every recipe by name, in the order a user is offered them (the bundled default's first).
RECIPES: dict[str, Recipe] = {r.name: r for r in (_DEFAULT, _PAPER)}


def recipe_names() -> list[str]:
    """The recipe names in offer order."""
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; :class:`InputError` naming the choices otherwise."""
    try:
        return RECIPES[str(name)]
    except KeyError:
        raise InputError(f"pretraining recipe: expected one of {', '.join(RECIPES)}, got {name!r}") from None
