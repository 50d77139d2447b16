"""Stepwise solvers: ``solve`` is the init/step loop bitwise, steps are pure, stochastic steps expose their Gaussian
transition (log-probability against the closed form), declared evaluation counts match the measured ones, and
gradients can be truncated to the last K steps. Solver lists come from the registry, so none escapes."""

import math

import pytest
import torch

from genkit.analytic import Gaussian
from genkit.errors import SolverError
from genkit.fields import FunctionField
from genkit.paths import get_path
from genkit.solvers import SOLVERS, Karras, SearchedSolver, Solver, Uniform, get_solver, solve

#: registered solvers declared not stepwise (none today; a wrapper added to the registry must be listed here)
NOT_STEPWISE: set[str] = set()
#: registered solvers whose steps are Gaussian draws exposed by ``transition``
GAUSSIAN = {"ancestral", "euler_maruyama"}

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)


def _fields():
    """(label, field, times): every registered solver runs on each (SDE solvers need g^2 finite on the grid)."""
    ddpm = Gaussian(MEAN, COV, get_path("ddpm"), "eps")
    lin = Gaussian(MEAN, COV, get_path("linear"), "velocity")
    return [("ddpm-eps-uniform", ddpm, Uniform().times(6, ddpm.path)),
            ("linear-velocity-karras", lin, Karras(t_max=0.95, t_min=0.0).times(5, lin.path))]


def _x(n=4):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _loop(solver, field, x, times, seed):
    gen = torch.Generator().manual_seed(seed)
    state = solver.init(field, x, times, generator=gen)
    states = [state]
    while not state.done:
        state = solver.step(field, state, generator=gen)
        states.append(state)
    return states


def test_registry_declarations():
    """Every registered solver declares stepping, transitions and evaluations; the lists above are the truth."""
    solvers = {n: get_solver(n) for n in SOLVERS.names()}
    assert {n for n, s in solvers.items() if not s.stepwise} == NOT_STEPWISE
    assert {n for n, s in solvers.items() if s.gaussian_transitions} == GAUSSIAN
    for name, s in solvers.items():
        assert (s.evals_per_step is None) == (not s.fixed_step), name  # adaptive: unknown beforehand
        assert s.evals_per_step is None or s.evals_per_step >= 1, name


@pytest.mark.parametrize("name", SOLVERS.names())
def test_solve_is_the_step_loop_bitwise(name):
    """solve(...) equals init + step until done, bitwise (samples, nfe, times, trajectory), on Gaussian fields;
    and the declared evaluation count equals the measured one."""
    solver = get_solver(name)
    for label, field, times in _fields():
        x = _x()
        if not solver.stepwise:  # declared: init and step refuse, naming what to use
            with pytest.raises(SolverError, match="solve"):
                solver.init(field, x, times)
            continue
        states = _loop(solver, field, x, times, seed=7)
        sol = solver.solve(field, x, times, generator=torch.Generator().manual_seed(7), trajectory=True)
        last = states[-1]
        assert torch.equal(last.x, sol.samples), (name, label)
        assert last.nfe == sol.nfe and torch.equal(last.times, sol.times), (name, label)
        assert last.n == len(last.times) - 1 and [s.n for s in states] == list(range(len(states)))
        if type(solver)._record is Solver._record:  # UniPC revises the entry it corrects
            assert torch.equal(torch.stack([s.x for s in states]), sol.trajectory), (name, label)
        top = solve(field, x, name, None, times, generator=torch.Generator().manual_seed(7))
        assert torch.equal(top.samples, sol.samples), (name, label)
        declared = solver.nfe(len(times) - 1, times=times, path=field.path)
        if solver.evals_per_step is None:
            assert declared is None, name
        else:
            assert declared == sol.nfe, (name, label, declared, sol.nfe)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_steps_are_pure(name):
    """Stepping twice from one state (same seed) gives the same next state, and leaves the state untouched."""
    solver = get_solver(name)
    _, field, times = _fields()[0]
    states = _loop(solver, field, _x(), times, seed=3)
    mid = states[2]
    before = mid.x.clone()
    a = solver.step(field, mid, generator=torch.Generator().manual_seed(1))
    b = solver.step(field, mid, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe and a.n == mid.n + 1
    assert torch.equal(mid.x, before) and mid.n == 2


def _posterior_x0(field, x, t):
    """E[x_0 | x_t] for x_0 ~ N(MEAN, COV), in closed form (independent of the field's own conversions)."""
    a, s = float(field.path.alpha(torch.tensor(t, dtype=torch.float64))), \
        float(field.path.sigma(torch.tensor(t, dtype=torch.float64)))
    gain = a * COV @ torch.linalg.inv(a * a * COV + s * s * torch.eye(2, dtype=torch.float64))
    return MEAN + (x - a * MEAN) @ gain.T


def _gauss_logpdf(x, mean, var):
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).sum(1)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_transition_is_the_ddpm_posterior(eta):
    """eta = 1: N(alpha_s sigma_{t|s}^2 / sigma_t^2 x0 + alpha_{t|s} sigma_s^2 / sigma_t^2 x_t, sigma_{t|s}^2
    sigma_s^2 / sigma_t^2) (Ho et al.); eta < 1: DDIM's N(alpha_s x0 + sqrt(sigma_s^2 - std^2) eps, std^2) with
    std = eta * that posterior std (Song et al.). The state's log_prob is that density at the drawn x, to 1e-10."""
    field = Gaussian(MEAN, COV, get_path("ddpm"), "eps")
    times = Uniform().times(5, field.path)
    solver = get_solver("ancestral", eta=eta)
    states = _loop(solver, field, _x(), times, seed=5)
    for n in range(len(times) - 1):
        t, s_ = float(times[n]), float(times[n + 1])
        a_t, a_s = (float(field.path.alpha(torch.tensor(v, dtype=torch.float64))) for v in (t, s_))
        sg_t, sg_s = (float(field.path.sigma(torch.tensor(v, dtype=torch.float64))) for v in (t, s_))
        a_ts = a_t / a_s
        var_ts = sg_t ** 2 - a_ts ** 2 * sg_s ** 2
        x_t, x_s = states[n].x, states[n + 1].x
        x0 = _posterior_x0(field, x_t, t)
        post_var = var_ts * sg_s ** 2 / sg_t ** 2
        if eta == 1.0:
            mean = a_s * var_ts / sg_t ** 2 * x0 + a_ts * sg_s ** 2 / sg_t ** 2 * x_t
        else:
            mean = a_s * x0 + math.sqrt(sg_s ** 2 - eta ** 2 * post_var) * (x_t - a_t * x0) / sg_t
        var = eta ** 2 * post_var
        tr = states[n + 1].transition
        torch.testing.assert_close(tr.mean, mean, rtol=0, atol=1e-12)
        assert abs(tr.std ** 2 - var) < 1e-14
        assert torch.allclose(states[n + 1].log_prob, _gauss_logpdf(x_s, mean, var), rtol=0, atol=1e-10)
        other = mean + 1.5 * math.sqrt(var) * torch.tensor([1.0, -0.5], dtype=torch.float64)  # a given x_next
        assert torch.allclose(tr.log_prob(other), _gauss_logpdf(other, mean, var), rtol=0, atol=1e-10)
        assert states[n + 1].log_prob.shape == (x_s.shape[0],)


def _alpha_sigma_and_derivatives(path, t):
    """alpha, sigma and their time derivatives by autograd on the path's schedule (not the solver's formulas)."""
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    a, s = path.alpha(tt), path.sigma(tt)
    da, = torch.autograd.grad(a, tt)
    ds, = torch.autograd.grad(s, tt)
    return float(a.detach()), float(s.detach()), float(da), float(ds)


@pytest.mark.parametrize("noise", ["fresh", "brownian_tree"])
def test_euler_maruyama_transition_closed_form(noise):
    """x_{n+1} ~ N(x + h [f x - g^2 score], g^2 |h|) with f = alpha'/alpha, g^2 = 2 sigma^2 (log(sigma/alpha))' and
    the Gaussian's exact score; the last step onto t = 0 is deterministic (std 0, log_prob None, scoring refused)."""
    field = Gaussian(MEAN, COV, get_path("cosine"), "x0")
    times = Uniform(t_max=0.9, t_min=0.0).times(5, field.path)
    states = _loop(get_solver("euler_maruyama", noise=noise), field, _x(), times, seed=9)
    for n in range(len(times) - 1):
        t, h = float(times[n]), float(times[n + 1] - times[n])
        a, s, da, ds = _alpha_sigma_and_derivatives(field.path, t)
        g2 = 2 * s * s * (ds / s - da / a)
        x_t = states[n].x
        prec = torch.linalg.inv(a * a * COV + s * s * torch.eye(2, dtype=torch.float64))
        score = -(x_t - a * MEAN) @ prec.T
        mean = x_t + h * (da / a * x_t - g2 * score)
        tr, nxt = states[n + 1].transition, states[n + 1]
        torch.testing.assert_close(tr.mean, mean, rtol=0, atol=1e-12)
        if n < len(times) - 2:
            assert abs(float(tr.std) ** 2 - g2 * abs(h)) < 1e-13
            assert torch.allclose(nxt.log_prob, _gauss_logpdf(nxt.x, mean, g2 * abs(h)), rtol=0, atol=1e-10)
        else:  # onto t = 0: no noise
            assert tr.deterministic and nxt.log_prob is None and torch.equal(nxt.x, tr.mean)
            with pytest.raises(SolverError, match="deterministic"):
                tr.log_prob(nxt.x)
    assert all(torch.isfinite(st.log_prob).all() for st in states[1:-1])


def test_ancestral_last_step_to_data_is_deterministic():
    field = Gaussian(MEAN, COV, get_path("cosine"), "x0")
    states = _loop(get_solver("ancestral"), field, _x(), Uniform(t_max=0.9, t_min=0.0).times(4, field.path), 2)
    assert states[-1].transition.deterministic and states[-1].log_prob is None
    assert all(torch.isfinite(st.log_prob).all() for st in states[1:-1])


@pytest.mark.parametrize("name", sorted(set(SOLVERS.names()) - GAUSSIAN))
def test_other_solvers_refuse_transitions(name):
    solver = get_solver(name)
    _, field, times = _fields()[0]
    state = solver.init(field, _x(), times)
    with pytest.raises(SolverError, match="Gaussian transitions"):
        solver.transition(field, state)
    assert solver.step(field, state, generator=torch.Generator().manual_seed(0)).transition is None


def test_truncated_backprop_through_last_k_steps():
    """dx/dt = theta x with Euler: x_N = prod_n (1 + h_n theta) x_0, so d x_N / d theta through the last K steps
    only (state detached before them) is x_N sum_{n >= N-K} h_n / (1 + h_n theta); the full graph sums all n."""
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    field = FunctionField(lambda x, t: theta * x, get_path("linear"), "velocity")
    x0 = _x().requires_grad_(True)
    times, big_n, k = Uniform().times(8, field.path), 8, 3
    euler = get_solver("euler")
    h = (times[1:] - times[:-1]).tolist()

    def run(cut):
        state = euler.init(field, x0, times)
        while not state.done:
            if state.n == cut:
                state = state.detach()
            state = euler.step(field, state)
        return state.x

    for cut, ns in ((big_n - k, range(big_n - k, big_n)), (None, range(big_n))):
        theta.grad, x0.grad = None, None
        xn = run(cut)
        xn.sum().backward()
        expect = float(xn.detach().sum()) * sum(h[n] / (1 + h[n] * float(theta.detach())) for n in ns)
        assert abs(float(theta.grad) - expect) < 1e-12
        assert (x0.grad is None) == (cut is not None)


def test_detach_cuts_multistep_memory():
    """A multistep solver's history is detached too: after the cut no gradient reaches x_0."""
    field = Gaussian(MEAN, COV, get_path("ddpm"), "eps")
    x0 = _x().requires_grad_(True)
    solver = get_solver("dpmpp_2m")
    state = solver.init(field, x0, Uniform().times(6, field.path))
    for _ in range(3):
        state = solver.step(field, state)
    cut = state.detach()
    assert not cut.x.requires_grad and not any(m.requires_grad for m in cut.memory[0])
    assert state.x.requires_grad  # the original is left as it was
    while not cut.done:
        cut = solver.step(field, cut)
    assert not cut.x.requires_grad  # the Gaussian field has no parameters: nothing left to differentiate


def test_searched_solver_steps():
    """A searched solver (with every extension, teleport jump included) is the loop over its steps too."""
    from genkit import fit_gaussian

    gen = torch.Generator().manual_seed(0)
    field = Gaussian(MEAN, COV, get_path("linear"), "velocity")
    fit = fit_gaussian(torch.randn(64, 2, generator=gen, dtype=torch.float64) * 0.5 + 1)
    solver = SearchedSolver(torch.randn(4, generator=gen, dtype=torch.float64),
                            torch.tril(torch.randn(3, 3, generator=gen, dtype=torch.float64) * 0.1, -1), field.path,
                            eval_shift=0.1 * torch.randn(3, generator=gen, dtype=torch.float64),
                            scales=1 + 0.1 * torch.randn(3, generator=gen, dtype=torch.float64), teleport=fit)
    x = _x()
    states = _loop(solver, field, x, solver.grid().times(3, field.path), seed=0)
    sol = solve(field, x, solver, trajectory=True)
    assert torch.equal(states[-1].x, sol.samples) and states[-1].nfe == sol.nfe == solver.nfe(3) == 3
    assert torch.equal(torch.stack([s.x for s in states]), sol.trajectory) and states[1].nfe == 0  # the free jump


def test_external_wrappers_declare_no_stepping():
    """Diffusers schedulers and k-diffusion samplers carry their own state: init/step refuse and say to use solve;
    the scheduler's declared NFE is its number of timesteps (2N - 1 for Heun)."""
    import diffusers

    from genkit.interop import DiffusersScheduler, KDiffusionSampler

    field = Gaussian(MEAN, COV, get_path("ddpm"), "eps")
    sched = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    for cls in (diffusers.EulerDiscreteScheduler, diffusers.HeunDiscreteScheduler):
        wrapper = DiffusersScheduler(cls(**sched))
        assert not wrapper.stepwise
        with pytest.raises(SolverError, match="_step_index"):
            wrapper.init(field, _x(), Uniform().times(5, field.path))
        assert wrapper.nfe(5) == solve(field, _x(), wrapper, 5).nfe
    k = KDiffusionSampler(lambda model, x, sigmas, **kw: x)
    assert not k.stepwise and k.nfe(5) is None
    with pytest.raises(SolverError, match="callback"):
        k.step(field, None)


def test_adaptive_torchsde_declares_no_stepping():
    solver = get_solver("sde_srk", adaptive=True)
    field = Gaussian(MEAN, COV, get_path("ddpm"), "eps")
    assert not solver.stepwise and solver.nfe(5) is None
    with pytest.raises(SolverError, match="adaptive=False"):
        solver.init(field, _x(), Uniform().times(5, field.path))
