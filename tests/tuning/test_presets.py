"""Presets are checked as tune() would check them, without running a study."""

from __future__ import annotations

import pytest

from deepspark.tuning.objectives import ImageClassifierObjective
from deepspark.tuning.presets import PRESETS, preset
from deepspark.tuning.space import load_space


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_space_and_default_configuration_are_valid(name) -> None:
    options = preset(name)
    space = load_space(options["space"])
    objective = ImageClassifierObjective(model=options["model"])
    space.check(objective.check)
    for param, value in objective.default_params(sorted(space.params)).items():
        assert space.contains(param, value), (param, value)


def test_sweep_is_a_learning_rate_by_width_grid_of_at_least_24_short_trials() -> None:
    options = preset("sweep")
    space = load_space(options["space"])
    assert options["sampler"] == "grid" and set(space.params) == {"learning_rate", "fc"}
    assert space.grid_size() >= 24 and options["trials"] == space.grid_size()
    assert space.fixed["epochs"] == 1
