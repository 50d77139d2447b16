"""The checks every distilling family makes of a frozen teacher: its sample shape and time range (read through
``as_*`` views), that it shares the student's path and shape, and that it is a multi-step field at all (a
one-step model declares :attr:`not_a_teacher`, saying why it is none)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError, ShapeError
from ..fields import Field, check_field
from ..paths import Path
from ..solvers import get_grid

__all__ = ["teacher_shape", "teacher_range", "check_teacher", "refuse_one_step_teacher"]


def teacher_shape(teacher: Any) -> tuple[int, ...] | None:
    """The sample shape of a teacher field (through ``as_*`` views), or None when it cannot be told."""
    base = getattr(teacher, "base", teacher)  # through as_* views
    if getattr(base, "sample_shape", None) is not None:
        return tuple(base.sample_shape)
    dim = getattr(base, "dim", None)  # analytic fields
    return (int(dim),) if isinstance(dim, int) and not isinstance(base, nn.Module) else None


def teacher_range(teacher: Any) -> tuple[float | None, float | None]:
    """``(t_min, t_max)`` of the teacher's own sampling grid (e.g. a diffusion model's training range)."""
    if not hasattr(teacher, "default_grid"):
        return None, None
    t_max, t_min = (float(v) for v in get_grid(teacher.default_grid("uniform")).times(1, teacher.path))
    return t_min, t_max


def check_teacher(teacher: Field, path: Path, sample_shape: tuple[int, ...], family: str) -> None:
    """A ConfigError for a teacher on another path, a ShapeError for one of another sample shape (each naming the
    fix); an unknown shape (a plain function field) passes."""
    check_field(teacher)
    if teacher.path != path:
        raise ConfigError(f"the teacher uses path {teacher.path!r} but the {family} model {path!r}; build the "
                          f"{family} model with path=teacher.path (from_teacher does)")
    shape = teacher_shape(teacher)
    if shape is not None and shape != tuple(sample_shape):
        raise ShapeError(f"the teacher makes samples of shape {shape} but the {family} model was built for "
                         f"{tuple(sample_shape)}; build it with sample_shape={shape} (from_teacher does)")


def refuse_one_step_teacher(teacher: Any, student: str) -> None:
    """A ConfigError when ``teacher`` (through ``as_*`` views) is a one- or few-step model, whose class says why in
    ``not_a_teacher`` (flow maps: MeanFlow, secant; one-step generators: SMT, SMD): distillation needs the
    multi-step field the data was learned by."""
    base = getattr(teacher, "base", teacher)
    reason = getattr(type(base), "not_a_teacher", None)
    if reason:
        raise ConfigError(f"a {base.family} model as the {student} teacher: {reason}")
