"""The family property suite, generated from the family registry (genkit.models.FAMILIES): every family
registers a tiny ``example()`` and must pass, with each sampler it supports, the same contracts: config and
checkpoint round trips (bitwise-identical samples), a finite loss with a gradient on every trainable
parameter (for a family with several optimizers, ``optimizers()``: each update's loss reaches its own optimizer's
parameters and together they reach all), sample shapes, determinism under a generator, and pathwise gradients
from ``rsample``.

A family with ``example_variants`` (e.g. a flow trained by data, and by an energy) runs every contract on each
``example(variant)``; a data-free example (``data_free = True``) has the batch None. A sampler without steps
(``takes_steps = False``, the exact sampler of a normalizing flow, the path sampler of an snf) is run without
``steps=``. A family of token sequences (``discrete = True``, masked diffusion) has no pathwise derivative: its
``rsample`` must refuse with a ConfigError saying so, and two seeds need only differ somewhere (a vocabulary of V
tokens repeats a position's token with probability about 1 / V).
"""

from __future__ import annotations

import json

import pytest
import torch

import genkit
from genkit.errors import ConfigError, DataError
from genkit.models import FAMILIES, ContinuousModel, build
from genkit.sampling import SAMPLERS, Sampler
from genkit.solvers import Solution

# genkit's own families (other test modules register throw-away ones in the same registry)
NAMES = [n for n in FAMILIES.names() if FAMILIES.get(n).__module__.startswith("genkit.")]
# (family, example variant): "default" is example() itself
CASES = [(n, v) for n in NAMES for v in getattr(FAMILIES.get(n), "example_variants", ("default",))]
STEPS = 2  # every sampler runs 2 steps here: the suite checks contracts, not quality


def steps(sampler) -> dict:
    """``steps=STEPS`` for a sampler that takes steps (a name or an object), nothing for a one-pass sampler."""
    cls = SAMPLERS.get(sampler) if isinstance(sampler, str) else type(sampler)
    return {"steps": STEPS} if cls.takes_steps else {}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_example(cls: type, variant: str = "default") -> tuple[ContinuousModel, torch.Tensor | None]:
    """The completeness check: ``cls.example()`` exists and returns (a model of cls, a batch it trains on), the
    batch None exactly when the model is data-free."""
    model, batch = cls.example() if variant == "default" else cls.example(variant)
    assert type(model) is cls, f"{cls.__name__}.example() returned a {type(model).__name__}"
    if getattr(model, "data_free", False):
        assert batch is None, "a data-free example trains on no batch"
    else:
        assert torch.is_tensor(batch) and batch.ndim >= 2 and tuple(batch.shape[1:]) == model.sample_shape
    return model, batch


@pytest.fixture(params=CASES, ids=[f"{n}-{v}" if v != "default" else n for n, v in CASES])
def example(request):
    return check_example(FAMILIES.get(request.param[0]), request.param[1])


def test_the_registry_holds_the_known_families():
    assert {"flow_matching", "diffusion", "secant", "nsf", "realnvp", "snf", "smt", "smd", "mdlm"} <= set(NAMES)
    assert any(getattr(check_example(FAMILIES.get(n), v)[0], "data_free", False) for n, v in CASES)  # one by energy


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_every_family_registers_an_example(case):
    a, batch_a = check_example(FAMILIES.get(case[0]), case[1])
    b, batch_b = check_example(FAMILIES.get(case[0]), case[1])
    assert (batch_a is None and batch_b is None) or torch.equal(batch_a, batch_b)  # seeded: the same every time
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_family_without_an_example_fails_the_completeness_check():
    class NoExample(ContinuousModel):
        family = "no_example"

    with pytest.raises(NotImplementedError, match="example"):
        check_example(NoExample)


def test_samplers_are_registered_and_the_default_is_first(example):
    model, _ = example
    names = model.samplers()
    assert names and all(n in SAMPLERS for n in names)
    default = model.default_sampler()
    assert isinstance(default, Sampler) and default.name == names[0]


def test_config_round_trip(example):
    model, _ = example
    config = model.config()
    assert build(config).config() == config
    assert build(json.loads(json.dumps(config))).config() == json.loads(json.dumps(config))  # as a checkpoint holds it


def test_checkpoint_round_trip_gives_identical_samples(example, tmp_path):
    model, _ = example
    genkit.save(tmp_path / "ckpt", model)
    loaded = genkit.load(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config() == model.config()
    model.eval()
    for name in model.samplers():
        a = model.sample(16, sampler=name, **steps(name), generator=gen(0))
        b = loaded.sample(16, sampler=name, **steps(name), generator=gen(0))
        assert torch.equal(a, b), name
    assert torch.equal(model.sample(16, generator=gen(1)), loaded.sample(16, generator=gen(1)))  # default sampler


def updates(model) -> list[str | None]:
    """The optimizer names of a model that trains several in turn (``optimizers()``, ``update(step)``: the trainer
    calls ``loss(..., update=name)``), else ``[None]``: one loss, called without ``update=``."""
    declared = getattr(model, "optimizers", None)
    names = list(declared()) if callable(declared) else []
    return names if len(names) > 1 else [None]


def test_loss_is_finite_and_reaches_every_trainable_parameter(example):
    """Each update's loss (one loss, or one per optimizer of a model with several) is finite, drawn from the
    generator alone and reaches its own optimizer's parameters; together they reach every trainable parameter."""
    model, batch = example
    trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assert trainable
    names = {id(p): k for k, p in trainable}
    reached: set[int] = set()
    for update in updates(model):
        kw = {} if update is None else {"update": update}
        model.zero_grad(set_to_none=True)
        loss, logs = model.loss(batch, generator=gen(0), **kw)
        assert loss.ndim == 0 and torch.isfinite(loss) and isinstance(logs, dict), update
        again, _ = model.loss(batch, generator=gen(0), **kw)
        assert torch.equal(loss, again), update  # the generator draws all of the loss's randomness
        loss.backward()
        if update is None:
            own = [p for _, p in trainable]
        else:
            groups = {g.name: g for g in model.param_groups()}
            own = [p for group in model.optimizers()[update] for p in groups[group].params]
            assert own, f"optimizer {update!r} has no parameters"
        for p in own:
            assert p.grad is not None, f"{names[id(p)]} gets no gradient from the loss of update {update!r}"
            assert torch.isfinite(p.grad).all(), (names[id(p)], update)
        assert sum(float(p.grad.abs().sum()) for p in own) > 0, update
        reached |= {id(p) for _, p in trainable if p.grad is not None}
    missing = [k for k, p in trainable if id(p) not in reached]
    assert not missing, f"no update's loss reaches {missing}"


def test_a_loss_that_needs_data_says_so_when_given_none(example):
    """A loss that trains on data refuses None; a data-free loss (its own samples) refuses data instead."""
    model, batch = example
    if getattr(model, "data_free", False):
        with pytest.raises(ConfigError, match=r"data_free.*without data"):
            model.loss(torch.zeros(4, *model.sample_shape), generator=gen(0))
        return
    with pytest.raises(DataError, match=r"got none \(batch=None\).*Trainer.fit\(data\)"):
        model.loss(None, generator=gen(0))


def test_sample_shapes_for_every_sampler(example):
    model, _ = example
    for name in model.samplers():
        x = model.sample(5, sampler=name, **steps(name), generator=gen(0))
        assert x.shape == (5, *model.sample_shape) and torch.isfinite(x).all(), name
        sol = model.sample(5, sampler=name, **steps(name), generator=gen(0), return_solution=True)
        assert isinstance(sol, Solution) and torch.equal(sol.samples, x), name
        assert sol.nfe >= steps(name).get("steps", 1), name


def test_sampling_is_deterministic_under_a_generator(example):
    model, _ = example
    for name in model.samplers():
        a, b, c = (model.sample(8, sampler=name, **steps(name), generator=gen(seed)) for seed in (3, 3, 4))
        assert torch.equal(a, b), name
        if getattr(model, "discrete", False):
            assert not torch.equal(a, c), name  # tokens: another seed changes the samples, not every position
        else:
            assert not torch.isclose(a, c).any(), name  # another seed moves every coordinate


def test_rsample_equals_sample_and_its_gradient_is_the_pathwise_derivative(example):
    """``d mean(rsample) / d theta`` by autograd equals the central finite difference (float64, h = 1e-5)."""
    model, _ = example
    if getattr(model, "discrete", False):  # tokens have no pathwise derivative: rsample refuses, saying why
        with pytest.raises(ConfigError, match="discrete.*no pathwise derivative"):
            model.rsample(6, **steps(model.default_sampler()), generator=gen(0))
        return
    model = model.double().eval()
    p = [q for q in model.parameters() if q.requires_grad][-1]  # the output layer's bias
    k = steps(model.default_sampler())
    x = model.rsample(6, **k, generator=gen(0))
    assert x.requires_grad and torch.equal(x.detach(), model.sample(6, **k, generator=gen(0)))
    (grad,) = torch.autograd.grad(x.mean(), p)
    h = 1e-5
    with torch.no_grad():
        p[0] += h
        up = model.sample(6, **k, generator=gen(0)).mean()
        p[0] -= 2 * h
        down = model.sample(6, **k, generator=gen(0)).mean()
        p[0] += h
    fd = float((up - down) / (2 * h))
    assert abs(grad[0].item()) > 1e-3
    assert grad[0].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_a_sampler_without_steps_refuses_them(example):
    """A one-pass sampler (``takes_steps = False``) refuses a step count, a grid and a solver, saying why."""
    model, _ = example
    for name in model.samplers():
        if SAMPLERS.get(name).takes_steps:
            continue
        for option in ({"steps": STEPS}, {"grid": "uniform"}, {"solver": "heun"}):
            with pytest.raises(ConfigError, match=f"takes no {next(iter(option))}=.*one pass"):
                model.sample(2, sampler=name, **option)
