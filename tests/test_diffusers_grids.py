"""diffusers-grade sampling of ddpm-path eps models: diffusers' timestep spacings as grids, x0 clipping and
dynamic thresholding honoured by every solver, and a Diffusion model's training range enforced on explicit grids."""

import pytest
import torch
from torch import nn

from genkit import Diffusion
from genkit.errors import ConfigError, TimeGridError
from genkit.fields import FunctionField, LimitedX0
from genkit.paths import X0Limit, get_path
from genkit.sampling import ODESampler
from genkit.solvers import DDIM, GRIDS, Leading, Linspace, Trailing, Uniform, get_grid, solve

diffusers = pytest.importorskip("diffusers")

DDPM = get_path("ddpm")
SPACINGS = {"leading": Leading, "trailing": Trailing, "linspace": Linspace}


@pytest.mark.parametrize("spacing", sorted(SPACINGS))
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_spacings_reproduce_ddim_timesteps_for_every_step_count(spacing: str, steps_offset: int) -> None:
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    grid = get_grid(spacing, steps_offset=steps_offset)
    assert isinstance(grid, SPACINGS[spacing]) and GRIDS.get(spacing) is SPACINGS[spacing]
    for n in range(1, 51):
        sched.set_timesteps(n)
        ks = sched.timesteps.tolist()
        assert grid.timesteps(n, DDPM) == ks, n
        times = grid.times(n, DDPM)
        # timestep k is t = (k + 1) / N, where the ddpm path's alpha^2 equals alphas_cumprod[k]; then t = 0
        assert times.tolist() == [(k + 1) / 1000 for k in ks] + [0.0], n
        abar = DDPM.alpha(times[:-1]) ** 2
        torch.testing.assert_close(abar, sched.alphas_cumprod.double()[ks], rtol=1e-6, atol=0)


def test_spacing_grids_name_themselves_and_check_options() -> None:
    assert repr(Leading()) == "Leading()" and Leading().name == "leading"
    assert repr(Trailing(steps_offset=1)) == "Trailing(steps_offset=1)"
    with pytest.raises(ConfigError, match="steps_offset"):
        Leading(steps_offset=-1)
    with pytest.raises(ConfigError, match="exceed the 1000 training timesteps"):
        Leading().times(1001, DDPM)


class _TinyEps(nn.Module):
    """A fixed smooth eps network on 2x4x4 fields (no training needed: any network is a field)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(32, 32, generator=g, dtype=torch.float64) / 4)
        self.b = nn.Parameter(torch.randn(32, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        return torch.tanh(h @ self.w + self.b * t[:, None] * 3).reshape(x.shape) * 1.5

    def config(self) -> dict:
        return {"name": "tiny_eps"}


def _model(**kwargs) -> Diffusion:
    model = Diffusion(_TinyEps(), "ddpm", "eps", sample_shape=(2, 4, 4), t_max=1.0, **kwargs)
    return model.double().requires_grad_(False)


def _diffusers_ddim(model: Diffusion, x: torch.Tensor, n: int, use_clipped_model_output: bool = True,
                    **config) -> torch.Tensor:
    sched = diffusers.DDIMScheduler(**config)
    # diffusers' schedule computed in float64 (its own runs in float32, 1e-7 relative off the exact products)
    sched.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    sched.set_timesteps(n)
    for k in sched.timesteps.tolist():
        t = torch.full((x.shape[0],), (k + 1) / 1000, dtype=torch.float64)
        x = sched.step(model(x, t), k, x, use_clipped_model_output=use_clipped_model_output).prev_sample
    return x


CASES = [({"clip_sample": False}, None), ({"clip_sample": True}, X0Limit(clip_sample=True)),
         ({"clip_sample": True, "clip_sample_range": 0.5}, X0Limit(clip_sample=True, clip_sample_range=0.5)),
         ({"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
          X0Limit(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9))]


@pytest.mark.parametrize("config,limit", CASES)
@pytest.mark.parametrize("spacing,n", [("leading", 5), ("leading", 7), ("trailing", 10), ("trailing", 4)])
def test_genkit_ddim_equals_diffusers_ddim_from_the_same_noise(config, limit, spacing: str, n: int) -> None:
    """Same noise, same network: genkit's DDIM on diffusers' grid (its last step the final denoising step, one
    evaluation, as DDIM's step to alpha = 1) equals DDIMScheduler, with x0 clipping or thresholding read from the
    model. Trailing at n = 4 and 10 (N // n = the listed spacing, so diffusers steps to the next listed time).

    The limit acts on the field (x0 limited, eps implied by it), which is diffusers' ``use_clipped_model_output=True``
    (GLIDE's choice); diffusers' default (False) pairs the limited x0 with the unlimited eps, which depends on the
    step's end time, so no field reproduces it (checked below: it differs); ``DDIM(use_clipped_model_output=False)``
    takes that noise from the unlimited prediction and equals it."""
    model = _model(x0_limit=limit)
    x = 2.0 * torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = _diffusers_ddim(model, x, n, timestep_spacing=spacing, **config)
    sol = ODESampler("ddim", n, SPACINGS[spacing]()).sample(model, x)
    assert sol.nfe == n
    torch.testing.assert_close(sol.samples, ref, rtol=0, atol=1e-5)
    if limit is not None:  # the limit changed the result (the test can fail)
        plain = ODESampler("ddim", n, SPACINGS[spacing]()).sample(_model(), x).samples
        assert (plain - ref).abs().max() > 1e-2
        assert float(sol.samples.detach().abs().max()) <= 1.0 + 1e-12  # the last step returns the limited x0
        mixed = _diffusers_ddim(model, x, n, use_clipped_model_output=False, timestep_spacing=spacing, **config)
        assert n == 1 or (mixed - ref).abs().max() > 1e-3
        # diffusers' step default (the limited x0 with the unlimited eps) is DDIM(use_clipped_model_output=False)
        own = ODESampler(DDIM(use_clipped_model_output=False), n, SPACINGS[spacing]()).sample(model, x)
        assert own.nfe == n
        torch.testing.assert_close(own.samples, mixed, rtol=0, atol=1e-5)


def test_every_solver_reads_the_limited_x0() -> None:
    """The limit lives in one field wrapper, so multistep, Heun and stochastic solvers see it too: each gives what it
    gives on the field whose x0 prediction is the clipped one, and differs from the unclipped field."""
    f = FunctionField(lambda x, t: 4 * torch.sin(3 * x), "cosine", "x0")
    clipped = FunctionField(lambda x, t: (4 * torch.sin(3 * x)).clamp(-1, 1), "cosine", "x0")
    lim = LimitedX0(f, clip_sample=True)
    assert lim.prediction == "x0" and lim.path is f.path
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = Uniform(t_max=0.99, t_min=0.0)
    for solver in ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "deis", "euler", "heun", "euler_maruyama"):
        out, want, plain = (solve(field, x, solver, 8, grid, generator=torch.Generator().manual_seed(0)).samples
                            for field in (lim, clipped, f))
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12, msg=solver)
        assert float((plain - out).abs().max()) > 0.1, solver
    # DDIM's last step to t = 0 returns the (limited) x0 itself
    assert float(solve(lim, x, "ddim", 8, grid).samples.abs().max()) <= 1.0


def test_dynamic_thresholding_closed_form() -> None:
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.5]], dtype=torch.float64)
    out = X0Limit(thresholding=True, dynamic_thresholding_ratio=0.5, sample_max_value=4.0)(x0)
    # sample 0: median of |x0| = (0.5 + 2) / 2 = 1.25 -> clamp to [-1.25, 1.25], divide by 1.25
    torch.testing.assert_close(out[0], x0[0].clamp(-1.25, 1.25) / 1.25)
    torch.testing.assert_close(out[1], x0[1])  # s clamps to 1: plain clipping, already inside
    with pytest.raises(ConfigError, match="dynamic_thresholding_ratio"):
        X0Limit(thresholding=True, dynamic_thresholding_ratio=0.0)


def test_x0_limit_is_saved_with_the_model() -> None:
    model = _model(x0_limit={"thresholding": True})
    saved = model.extra_config()["x0_limit"]
    assert saved["thresholding"] is True and X0Limit(**saved) == model.x0_limit
    assert _model().extra_config()["x0_limit"] is None
    with pytest.raises(ConfigError, match="x0_limit"):
        _model(x0_limit="clip")


def test_explicit_grid_below_t_eps_is_an_error_naming_t_eps() -> None:
    model = _model()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    for grid in (Uniform(), Uniform(t_min=1e-4), [1.0, 0.5, 5e-4]):
        with pytest.raises(TimeGridError, match=r"t_eps=0\.001"):
            ODESampler("ddim", None if isinstance(grid, list) else 4, grid).sample(model, x)
        with pytest.raises(TimeGridError, match=r"t_eps=0\.001"):
            solve(model, x, "ddim", None if isinstance(grid, list) else 4, grid)
    # inside the range, or ending at exactly 0 from t >= t_eps (the final denoising step), is fine
    for grid in (Uniform(t_min=1e-3), [1.0, 0.5, 1e-3, 0.0], Leading()):
        ODESampler("ddim", None if isinstance(grid, list) else 3, grid).sample(model, x)
    # a grid by name runs over the training range, as before
    assert ODESampler("ddim", 4, "uniform").sample(model, x).times[-1].item() == pytest.approx(1e-3)
    for grid in (None, "uniform", "karras"):  # genkit.solve too: a name is filled in, never refused
        assert solve(model, x, "ddim", 4, grid).times[-1].item() == pytest.approx(1e-3)


def test_ddpm_eps_default_is_the_measured_one_and_costs_one_evaluation_per_step() -> None:
    """The default of a ddpm-path eps model (chosen in eval/bench_diffusers_sampling.py): DPM-Solver++(2M) on
    diffusers' leading timesteps; k steps cost k evaluations; a solver given without a grid gets that grid too."""
    model = _model()
    sampler = model.default_sampler()
    assert (sampler.solver, sampler.grid) == Diffusion.DDPM_EPS_DEFAULT == ("dpmpp_2m", "leading")
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sol = model.get_sampler(steps=5).sample(model, x)
    assert sol.nfe == 5 and sol.times.tolist() == [0.801, 0.601, 0.401, 0.201, 0.001]  # then E[x_0 | x_t]
    assert model.get_sampler(solver="ddim").grid == "leading"
    assert Diffusion(_TinyEps(), "ddpm", "eps", sample_shape=(2, 4, 4)).t_max == 1.0  # genkit's default range
    # trained only up to t_max < 1: diffusers' timesteps would start above it, so the uniform default stays
    short = Diffusion(_TinyEps(), "ddpm", "eps", sample_shape=(2, 4, 4), t_max=0.7)
    assert short.default_sampler().solver == "heun"
    cosine = Diffusion(_TinyEps(), "cosine", "eps", sample_shape=(2, 4, 4))
    assert cosine.default_sampler().solver == "heun" and cosine.get_sampler(solver="ddim").grid == "uniform"
