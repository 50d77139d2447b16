"""Issue 9, deliverable 5 (library level): each rough edge a new user hit gets a genkit error naming the fix, or
the behaviour a user expects. Every test here failed on the tree before the fix (a torch error, a misleading
message, or nothing at all)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import genkit
from genkit.analytic import Gaussian
from genkit.errors import CheckpointError, ConfigError, DataError, DataWarning, ShapeError
from genkit.models import FlowMatching, Secant
from genkit.nets import MLP
from genkit.paths import get_path
from genkit.train import TrainConfig, Trainer, TrainResult

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def gauss() -> Gaussian:
    return Gaussian(torch.tensor([2.0]), torch.eye(1), get_path("linear"))


def tiny_train(tmp_path: Path, **changes) -> TrainConfig:
    base = dict(steps=3, batch_size=8, lr=1e-3, ema_decay=None, checkpoint_every=None, log_every=1,
                out_dir=str(tmp_path / "run"), progress=False, cpu=True)
    return TrainConfig(**{**base, **changes})


# 1. NumPy input to solve -------------------------------------------------------------------------------------
def test_numpy_state_is_refused_naming_torch_as_tensor_and_numpy_times_are_accepted() -> None:
    with pytest.raises(ShapeError, match=r"x must be a torch\.Tensor; got a numpy\.ndarray .*torch\.as_tensor\(x"):
        genkit.solve(gauss(), np.zeros((3, 1), dtype=np.float32), "heun", steps=4)
    x = torch.zeros(3, 1)
    grid = np.linspace(1.0, 0.0, 5)  # times are a grid, validated (and converted) like any sequence of floats
    assert torch.equal(genkit.solve(gauss(), x, "heun", grid=grid).samples,
                       genkit.solve(gauss(), x, "heun", grid=torch.from_numpy(grid)).samples)


# 2. Integer data to a continuous family ------------------------------------------------------------------------
def test_integer_data_to_a_continuous_family_says_to_convert(tmp_path: Path) -> None:
    model, batch = FlowMatching.example()
    with pytest.raises(ShapeError, match=r"continuous.*float.*batch\.float\(\).*discrete"):
        model.loss(batch.round().long())
    with pytest.raises(ShapeError, match=r"torch\.int64 but the flow_matching model is continuous.*\.float\(\)"):
        Trainer(model, tiny_train(tmp_path)).fit(batch.round().long())


# 3. search_solver under no_grad --------------------------------------------------------------------------------
def test_search_solver_runs_under_no_grad_or_inference_mode_and_finds_the_same_solver() -> None:
    from genkit.solvers.searched import search_solver

    kw = dict(shape=(1,), iters=4, batch=8, pool=16, holdout=16, reference_steps=10)
    free = search_solver(gauss(), 2, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        under = search_solver(gauss(), 2, generator=torch.Generator().manual_seed(0), **kw)
        assert not torch.is_grad_enabled()  # the caller's mode is restored after the search
    field = gauss()  # made outside: tensors made under inference_mode cannot enter autograd at all
    with torch.inference_mode():
        inference = search_solver(field, 2, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.is_inference_mode_enabled()
    for s in (under, inference):
        assert torch.equal(s.times, free.times) and torch.equal(s.coefficients, free.coefficients)


# 4. A keyword typo in log_prob ---------------------------------------------------------------------------------
def test_log_prob_keyword_typo_names_the_keyword_and_the_accepted_ones() -> None:
    model, batch = FlowMatching.example()
    with pytest.raises(ConfigError, match=r"'stpes'.*did you mean 'steps'"):
        model.log_prob(batch[:2], stpes=10)
    with pytest.raises(ConfigError, match=r"'exakt'.*divergence_mode"):  # no near option: refused by the field
        model.log_prob(batch[:2], solver="euler", steps=2, exakt=True)
    with pytest.raises(ConfigError, match=r"'stpes'.*steps"):
        genkit.ode_log_prob(gauss(), torch.zeros(2, 1), solver="euler", steps=2, stpes=3)


# 5. A seed or a string where a torch.Generator goes -------------------------------------------------------------
def test_generator_that_is_not_a_torch_generator() -> None:
    model, batch = FlowMatching.example()
    for call in (lambda g: genkit.solve(gauss(), torch.zeros(3, 1), "heun", steps=2, generator=g),
                 lambda g: model.sample(3, generator=g), lambda g: model.loss(batch, generator=g)):
        with pytest.raises(ConfigError, match=r"an int \(got 3\); pass generator=torch\.Generator\(\)\.manual_seed\(3"):
            call(3)
        with pytest.raises(ConfigError, match=r"generator must be a torch\.Generator.*'seed'.*manual_seed"):
            call("seed")


# 6. device="cuda" where there is no CUDA; 7. an unknown map_location -------------------------------------------
def test_cuda_on_a_machine_without_cuda_and_unknown_device_names(tmp_path: Path, monkeypatch) -> None:
    model, _ = FlowMatching.example()
    genkit.save(tmp_path / "ckpt", model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' but CUDA is not available.*device='cpu'"):
        model.sample(3, device="cuda")
    with pytest.raises(ConfigError, match=r"map_location='cuda' but CUDA is not available"):
        genkit.load(tmp_path / "ckpt", map_location="cuda")
    with pytest.raises(ConfigError, match=r"unknown map_location 'gpu'.*did you mean 'cuda'"):
        genkit.load(tmp_path / "ckpt", map_location="gpu")
    with pytest.raises(ConfigError, match=r"unknown device 'gpu'"):
        model.sample(3, device="gpu")


# 8. TrainConfig(stepz=10) --------------------------------------------------------------------------------------
def test_train_config_unknown_field_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown TrainConfig keys \['stepz'\] \(did you mean 'steps'"):
        TrainConfig(stepz=10)
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size' for 'batchsize'"):
        TrainConfig.from_dict({"batchsize": 8})
    assert TrainConfig(steps=10).steps == 10


# 9. genkit.save(model, dir) ------------------------------------------------------------------------------------
def test_save_with_the_arguments_swapped_says_the_order(tmp_path: Path) -> None:
    model, _ = FlowMatching.example()
    with pytest.raises(ConfigError, match=r"genkit\.save\(directory, model\).*swap"):
        genkit.save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# 10. Data far from unit scale ----------------------------------------------------------------------------------
def test_data_at_a_scale_of_1e6_warns_once_per_fit_with_the_scale(tmp_path: Path) -> None:
    model, batch = FlowMatching.example()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(model, tiny_train(tmp_path)).fit(batch * 1e6)
    said = [w for w in seen if issubclass(w.category, DataWarning)]
    assert len(said) == 1, [str(w.message) for w in seen]
    text = str(said[0].message)
    scale = float(re.search(r"scale of (\S+) \(root mean square", text).group(1))
    rms = float((batch * 1e6).pow(2).mean().sqrt())  # the data's RMS; the first batch's is within a factor 2
    assert rms / 2 < scale < rms * 2 and "normalise" in text
    model, batch = FlowMatching.example()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Trainer(model, tiny_train(tmp_path, out_dir=str(tmp_path / "unit"))).fit(batch)
    assert not [w for w in seen if issubclass(w.category, DataWarning)]


# 11. Misleading messages ---------------------------------------------------------------------------------------
def test_integer_state_names_x_not_t() -> None:
    with pytest.raises(ShapeError, match=r"x must be a floating-point tensor.*torch\.int64.*x\.float\(\)"):
        genkit.solve(gauss(), torch.zeros(3, 1, dtype=torch.long), "heun", steps=4)
    model, batch = FlowMatching.example()
    with pytest.raises(ShapeError, match=r"x is torch\.int64.*continuous.*x\.float\(\)"):
        model(batch.long(), torch.full((len(batch),), 0.5))
    g = Gaussian(torch.ones(2), torch.eye(2) * 0.25, get_path("linear"))
    secant = Secant(MLP(2, hidden=16), teacher=g, steps=2, sample_shape=(2,))
    with pytest.raises(ShapeError, match=r"x is torch\.int64 but the secant model is continuous"):
        secant.flow_map(batch.long(), 1.0, 0.0)


@pytest.mark.parametrize("solver", ["heun", "dopri5"])
def test_nan_state_is_said_to_be_the_input_not_a_singular_field(solver: str) -> None:
    x = torch.zeros(3, 1)
    x[1, 0] = float("nan")
    with pytest.raises(DataError, match=r"the initial state x holds 1 NaN/inf value"):
        genkit.solve(gauss(), x, solver, steps=4)


def test_log_prob_of_nan_input_names_the_input() -> None:
    model, batch = FlowMatching.example()
    x = batch[:3].clone()
    x[2, 1] = float("nan")
    with pytest.raises(DataError, match=r"log_prob: x holds 1 NaN/inf value.*sample 2"):
        model.log_prob(x)


def test_a_searched_solver_folder_given_to_load_says_what_it_is(tmp_path: Path) -> None:
    from genkit.solvers.searched import search_solver

    solver = search_solver(gauss(), 2, shape=(1,), iters=2, batch=8, pool=16, holdout=16, reference_steps=4)
    solver.save(tmp_path / "solver")
    with pytest.raises(CheckpointError, match=r"searched-solver folder.*genkit\.get_solver"):
        genkit.load(tmp_path / "solver")
    assert genkit.get_solver(tmp_path / "solver").default_steps == 2  # what the message points to works


def test_a_secant_model_as_a_teacher_is_refused_naming_its_own_teacher() -> None:
    g = Gaussian(torch.ones(2), torch.eye(2) * 0.25, get_path("linear"))
    secant = Secant(MLP(2, hidden=16), teacher=g, loss="sdei", steps=4, sample_shape=(2,))
    with pytest.raises(ConfigError, match=r"secant model as the teacher.*learned jumps.*diffusion model it was "
                                          r"trained from \(this one's is a GaussianMixture field"):
        Secant(MLP(2, hidden=16), teacher=secant, steps=2, sample_shape=(2,))
    with pytest.raises(ConfigError, match=r"secant model as the teacher"):
        Secant.from_teacher(secant, steps=2)  # before, it shared the teacher's frozen network: no gradient at all


# 12. print(TrainResult) ----------------------------------------------------------------------------------------
def test_train_result_prints_short() -> None:
    ema = {f"net.layer{i}.weight": torch.randn(64, 64) for i in range(20)}
    r = TrainResult(step=5000, losses=[(s, 1.0 / s) for s in range(1, 5001)], checkpoint=Path("runs/x/checkpoint"),
                    ema=ema, skipped=2)
    text = repr(r)
    assert str(r) == text and len(text.splitlines()) <= 3 and len(text) < 300, text
    assert "step=5000" in text and "runs/x/checkpoint" in text and "0.0002" in text and "20 tensors" in text
