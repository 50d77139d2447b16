"""Time grids say what they do: options a grid cannot take are errors, validated grids are float64."""

import pytest
import torch

from genkit.errors import ConfigError, TimeGridError
from genkit.paths import get_path
from genkit.solvers import GRIDS, Karras, Uniform, get_grid, validate_grid

LINEAR = get_path("linear")


def test_options_with_a_built_grid_are_an_error_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"\['t_max'\] given with a built Uniform grid.*Uniform\(t_max=0.5\)"):
        get_grid(Uniform(), t_max=0.5)
    with pytest.raises(ConfigError, match="explicit grid times"):
        get_grid([1.0, 0.5, 0.0], t_min=0.1)
    grid = Karras()
    assert get_grid(grid) is grid
    assert get_grid("uniform", t_max=0.5).times(2, LINEAR).tolist() == [0.5, 0.25, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int64])
def test_validate_grid_returns_float64(dtype: torch.dtype) -> None:
    t = validate_grid(torch.tensor([1, 0], dtype=dtype))
    assert t.dtype == torch.float64 and t.device.type == "cpu" and t.tolist() == [1.0, 0.0]
    assert validate_grid([1.0, 0.25, 0.0]).dtype == torch.float64
    # float32 times are widened, not re-rounded: the float64 value of each float32 time
    third = torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float32)
    assert validate_grid(third)[1].item() == third[1].item()


@pytest.mark.parametrize("name", [n for n in GRIDS.names() if n != "custom"])
def test_every_named_grid_is_float64_and_validated(name: str) -> None:
    t = get_grid(name).times(5, get_path("cosine"))
    assert t.dtype == torch.float64 and len(t) == 6 and bool((t[1:] < t[:-1]).all())


def test_validate_grid_rejects_bad_grids() -> None:
    for bad, what in (([1.0], "at least 2"), ([1.0, 1.0], "strictly monotone"), ([1.2, 0.0], r"\[0, 1\]"),
                      ([1.0, float("nan")], r"\[0, 1\]"), ([[1.0, 0.0]], "1-D")):
        with pytest.raises(TimeGridError, match=what):
            validate_grid(bad)
