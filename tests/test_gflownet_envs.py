"""The GFlowNet environment property suite, generated from the registry ``genkit.models.gflownet.ENVIRONMENTS``:
every registered environment must have a test config below (a new one cannot skip the suite), and on each config
random walks check the protocol's laws (masks, step / backward-step inverses, terminal states, enumeration).
The error tests check that user mistakes raise the genkit exception that names them."""

from __future__ import annotations

import math

import pytest
import torch

from genkit.errors import ActionError, ConfigError, DataError, ShapeError
from genkit.models.gflownet import (
    ENVIRONMENTS,
    HyperGrid,
    check_linear_reward,
    exact_log_z,
    get_env,
    true_distribution,
)

#: small test configs of every registered environment (sequence_design: the exact, network-free DNA activity,
#: never the oracle names, which train a network)
CONFIGS: dict[str, list[dict]] = {
    "hypergrid": [{"ndim": 2, "height": 4}, {"ndim": 3, "height": 3, "encoding": "onehot"},
                  {"ndim": 1, "height": 5, "encoding": "identity"}],
    "bitseq": [{"length": 4, "word": 2}, {"length": 4, "word": 1, "order": "any", "n_modes": 2},
               {"length": 6, "word": 2, "order": "any"}],
    "sequence_design": [{"length": 12, "reward": "dna_activity"},
                        {"length": 4, "reward": f"{__file__}:gc_count", "beta": 0.5}],  # enumerable: 341 states
}

def gc_count(x: torch.Tensor) -> torch.Tensor:
    """A tiny network-free reward for an enumerable sequence_design: the number of C / G bases."""
    return ((x == 1) | (x == 2)).sum(1).double()


CASES = [pytest.param(name, cfg, id=f"{name}-{i}") for name in ENVIRONMENTS.names() for i, cfg in
         enumerate(CONFIGS.get(name, [{}]))]


def make(name: str, cfg: dict, **extra):
    return get_env({"name": name, **cfg, **extra})


def test_every_registered_environment_has_a_test_config() -> None:
    """The suite covers the registry: each registered name has at least one config here (and no stale ones)."""
    names = set(ENVIRONMENTS.names())
    assert names >= {"hypergrid", "bitseq", "sequence_design"}
    assert set(CONFIGS) == names, f"give test configs for {sorted(names - set(CONFIGS))} in CONFIGS"


def random_walks(env, n: int, seed: int = 0):
    """``n`` walks of uniformly random allowed actions from the initial state; yields (states, actions, children)
    for the walks still moving at each step, and returns the terminal objects and lengths."""
    g = torch.Generator().manual_seed(seed)
    s = env.initial(n)
    done = torch.zeros(n, dtype=torch.bool)
    lengths = torch.zeros(n, dtype=torch.long)
    records = []
    terminal = s.clone()
    for _ in range(env.max_actions):
        mask = env.forward_mask(s)
        a = torch.multinomial(mask.double(), 1, generator=g)[:, 0]
        a = torch.where(done, -1, a)
        lengths += (~done).long()
        stop = ~done & (a == env.exit)
        terminal[stop] = s[stop]
        done = done | stop
        moving = ~done
        if moving.any():
            child = env.step(s[moving], a[moving])
            records.append((s[moving], a[moving], child))
            s = s.clone()
            s[moving] = child
        if done.all():
            break
    return records, terminal, lengths, done


@pytest.mark.parametrize("name, cfg", CASES)
def test_initial_state(name, cfg) -> None:
    """The initial state is is_initial, has no backward action (no parent) and some forward action."""
    env = make(name, cfg)
    s0 = env.initial(3)
    assert s0.shape == (3, *env.state_shape) and not s0.is_floating_point()
    assert env.is_initial(s0).all()
    assert not env.backward_mask(s0).any()
    assert env.forward_mask(s0).any(1).all()
    env.check_states(s0)


@pytest.mark.parametrize("name, cfg", CASES)
def test_mask_shapes_and_dtypes(name, cfg) -> None:
    """forward_mask is bool [n, n_actions] and backward_mask bool [n, n_backward], on any reached states; the
    features are float [n, input_dim]."""
    env = make(name, cfg)
    records, terminal, _, _ = random_walks(env, 16)
    states = torch.cat([env.initial(1), terminal, *[c for _, _, c in records]])
    fm, bm = env.forward_mask(states), env.backward_mask(states)
    assert fm.dtype == torch.bool and fm.shape == (len(states), env.n_actions)
    assert bm.dtype == torch.bool and bm.shape == (len(states), env.n_backward)
    x = env.to_input(states)
    assert x.is_floating_point() and x.shape == (len(states), env.input_dim)
    assert env.exit == env.n_actions - 1


@pytest.mark.parametrize("name, cfg", CASES)
def test_random_walks_obey_the_protocol(name, cfg) -> None:
    """Along random walks of allowed actions: backward_step(step(s, a), backward_action(s, a)) == s exactly; the
    backward action is allowed at the child and forward_action(child, b) == a; for every allowed backward action b
    of a child, step(backward_step(child, b), forward_action(child, b)) == child; every reached state is valid and
    non-initial states have a parent; every walk exits within max_actions, at a terminating state with a finite
    reward."""
    env = make(name, cfg)
    records, terminal, lengths, done = random_walks(env, 64)
    assert done.all() and (lengths <= env.max_actions).all() and (lengths >= 1).all()
    for parent, a, child in records:
        env.check_states(child)
        b = env.backward_action(parent, a)
        assert env.backward_mask(child).gather(1, b[:, None]).all()
        assert torch.equal(env.backward_step(child, b), parent)
        assert torch.equal(env.forward_action(child, b), a)
        assert not env.is_initial(child).any() and env.backward_mask(child).any(1).all()
        assert env.forward_mask(child).any(1).all()  # no dead ends
        rows, bs = env.backward_mask(child).nonzero().T  # every parent, not only the one the walk came from
        parents = env.backward_step(child[rows], bs)
        a_back = env.forward_action(child[rows], bs)
        assert env.forward_mask(parents).gather(1, a_back[:, None]).all() and (a_back != env.exit).all()
        assert torch.equal(env.step(parents, a_back), child[rows])
        assert torch.equal(env.backward_action(parents, a_back), bs)
    assert env.terminating(terminal).all()
    log_r = env.log_reward(terminal)
    assert log_r.shape == (len(terminal),) and torch.isfinite(log_r).all()


@pytest.mark.parametrize("name, cfg", CASES)
def test_advance_steps_the_moving_rows_only(name, cfg) -> None:
    """``env.advance(states, actions, moving)`` (the rollout's batched step, which an environment may override)
    equals ``step`` on the moving rows and leaves the others (exit, or already finished: action -1) unchanged."""
    from genkit.models.gflownet import Environment

    env = make(name, cfg)
    for states, actions, children in random_walks(env, 64, seed=3)[0]:
        mask = env.forward_mask(states)
        g = torch.Generator().manual_seed(len(states))
        stop = torch.rand(len(states), generator=g) < 0.3  # mark some rows as exiting or finished
        a = torch.where(stop, torch.where(mask[:, env.exit], env.exit, -1), actions)
        moving = (a >= 0) & (a != env.exit)
        expected = torch.where(moving.view(-1, *[1] * len(env.state_shape)), children, states)
        assert torch.equal(env.advance(states, a, moving), expected)
        assert torch.equal(Environment.advance(env, states, a, moving), expected)


@pytest.mark.parametrize("name, cfg", CASES)
def test_exit_allowed_exactly_where_terminating(name, cfg) -> None:
    """terminating(s) is the exit column of forward_mask; where the environment rewards terminal objects only,
    a non-terminating state has no reward (DataError)."""
    env = make(name, cfg)
    records, terminal, _, _ = random_walks(env, 32, seed=1)
    states = torch.cat([env.initial(1), terminal, *[c for _, _, c in records]])
    assert torch.equal(env.terminating(states), env.forward_mask(states)[:, env.exit])
    inner = states[~env.terminating(states)]
    if len(inner) and not env.intermediate_reward:
        with pytest.raises(DataError, match="not a terminal object"):
            env.log_reward(inner[:1])


ENUMERABLE = [c for c in CASES if make(*c.values).enumerable]


def test_some_configs_are_enumerable() -> None:
    assert {c.values[0] for c in ENUMERABLE} == {"hypergrid", "bitseq", "sequence_design"}


@pytest.mark.parametrize("name, cfg", ENUMERABLE)
def test_enumeration(name, cfg) -> None:
    """all_states() lists each state once, index(all_states()) == arange, each state's parents are listed before
    it (topological order), and every state a random walk reaches is listed."""
    env = make(name, cfg)
    states = env.all_states()
    assert len({tuple(r) for r in states.tolist()}) == len(states)
    assert torch.equal(env.index(states), torch.arange(len(states)))
    env.check_states(states)
    assert int(env.is_initial(states).sum()) == 1 and env.index(env.initial(1)).item() == 0
    rows, b = env.backward_mask(states).nonzero().T
    parents = env.backward_step(states[rows], b)
    pidx = env.index(parents)
    assert torch.equal(states[pidx], parents)  # every parent is in all_states
    assert (pidx < rows).all()  # and comes before its child
    records, terminal, _, _ = random_walks(env, 32)
    for _, _, child in records:
        assert torch.equal(states[env.index(child)], child)


@pytest.mark.parametrize("name, cfg", ENUMERABLE)
def test_true_distribution(name, cfg) -> None:
    """true_distribution sums to 1, is 0 where exit is not allowed, and is R(x) / Z on terminal objects."""
    env = make(name, cfg)
    p = true_distribution(env)
    states = env.all_states()
    term = env.terminating(states)
    assert p.dtype == torch.float64 and p.shape == (len(states),)
    assert abs(float(p.sum()) - 1) < 1e-12
    assert (p[~term] == 0).all() and (p[term] > 0).all()
    r = env.log_reward(states[term]).double().exp()
    torch.testing.assert_close(p[term], r / r.sum(), rtol=1e-12, atol=0)


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", CASES)
def test_bad_actions_raise(name, cfg) -> None:
    """Out-of-range actions are ActionErrors, the exit action is not a step, and non-integer or mis-shaped
    actions are ShapeErrors, for step and backward_step alike."""
    env = make(name, cfg)
    s = env.initial(2)
    child = env.step(s, torch.multinomial(env.forward_mask(s)[:, :-1].double(), 1)[:, 0])
    for bad in (env.n_actions + 3, -1):
        with pytest.raises(ActionError, match="outside"):
            env.step(s, torch.tensor([0, bad]))
    with pytest.raises(ActionError):
        env.step(s, torch.full((2,), env.exit))
    with pytest.raises(ActionError, match="outside"):
        env.backward_step(child, torch.tensor([0, env.n_backward]))
    with pytest.raises(ShapeError):
        env.step(s, torch.zeros(2))  # float
    with pytest.raises(ShapeError):
        env.step(s, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ShapeError):
        env.step(s, torch.zeros(3, dtype=torch.long))  # one per state
    with pytest.raises(ShapeError):
        env.step(s, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ActionError, match="not allowed"):
        env.backward_step(env.initial(1), torch.zeros(1, dtype=torch.long))  # the initial state has no parent


@pytest.mark.parametrize("name, cfg", CASES)
def test_bad_states_raise(name, cfg) -> None:
    """States of the wrong shape or dtype are ShapeErrors; values outside the environment are DataErrors."""
    env = make(name, cfg)
    s = env.initial(2)
    with pytest.raises(ShapeError):
        env.check_states(s[:, :-1] if s.shape[1] > 1 else s[:, None])
    with pytest.raises(ShapeError):
        env.check_states(s.double())
    with pytest.raises(ShapeError):
        env.check_states(s[0])
    with pytest.raises(ShapeError):
        env.step(s.float(), torch.zeros(2, dtype=torch.long))
    bad = s.clone()
    bad[1, 0] = 10 ** 6
    with pytest.raises(DataError, match=r"states\[1\]"):
        env.check_states(bad)
    with pytest.raises(DataError):
        env.step(bad, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name, cfg", CASES)
def test_validate_must_be_explicit_bool(name, cfg) -> None:
    """validate is on by default and only a real bool turns it off."""
    assert make(name, cfg).validate is True
    assert make(name, cfg, validate=False).validate is False
    with pytest.raises(ConfigError):
        make(name, cfg, validate="no")


def test_hypergrid_action_error_names_the_state() -> None:
    """+1 at the edge is not allowed: the ActionError names the state, the action and what is allowed."""
    env = HyperGrid(ndim=2, height=4)
    s = torch.tensor([[1, 2], [3, 0]])
    with pytest.raises(ActionError, match=r"action 0 is not allowed in state \[3, 0\] \(row 1\).*allowed there: "
                                          r"\[1\]"):
        env.step(s, torch.tensor([0, 0]))
    with pytest.raises(ActionError, match=r"backward action 1 is not allowed in state \[3, 0\]"):
        env.backward_step(s, torch.tensor([0, 1]))


def test_hypergrid_validate_false_skips_the_check() -> None:
    """validate=False is the explicit fast path: an invalid action then goes through step (to a point outside the
    grid, which check_states still catches), where validate=True raises."""
    s = torch.tensor([[3, 0]])
    with pytest.raises(ActionError):
        HyperGrid(ndim=2, height=4).step(s, torch.tensor([0]))
    fast = HyperGrid(ndim=2, height=4, validate=False)
    out = fast.step(s, torch.tensor([0]))
    assert out.tolist() == [[4, 0]]
    with pytest.raises(DataError):
        fast.check_states(out)


@pytest.mark.parametrize("bad", [[4, 0], [0, -1], [2, 7]])
def test_hypergrid_state_outside(bad) -> None:
    """A coordinate equal to the height, or negative, is not a grid point: DataError naming it."""
    env = HyperGrid(ndim=2, height=4)
    with pytest.raises(DataError, match=str(bad).replace("[", r"\[").replace("]", r"\]")):
        env.check_states(torch.tensor([[0, 0], bad]))
    with pytest.raises(DataError):
        env.log_reward(torch.tensor([bad]))


def test_non_positive_linear_reward() -> None:
    """r0 = 0 would give R = 0 off the bands (log R = -inf): a ConfigError; check_linear_reward refuses 0,
    negative and non-finite rewards with a DataError naming the row, and is log on positive ones."""
    with pytest.raises(ConfigError, match="r0 must be > 0"):
        HyperGrid(ndim=2, height=8, r0=0.0)
    with pytest.raises(ConfigError):
        HyperGrid(ndim=2, height=8, r0=-0.1)
    for bad, row in (([1.0, 0.0], 1), ([-2.0, 1.0], 0), ([1.0, 1.0, math.inf], 2), ([math.nan], 0)):
        with pytest.raises(DataError, match=f"row {row}"):
            check_linear_reward(torch.tensor(bad), "test reward")
    r = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(check_linear_reward(r, "ok"), r.log())


@pytest.mark.parametrize("x, reward", [((1, 1), 2.6), ((0, 0), 0.6), ((3, 3), 0.1), ((7, 7), 0.6), ((6, 1), 2.6),
                                       ((0, 1), 0.6), ((1, 3), 0.1), ((2, 2), 0.1), ((0, 6), 0.6)])
def test_hypergrid_reward_by_hand(x, reward) -> None:
    """H = 8: a_i = |x_i / 7 - 0.5|; R = 0.1 + 0.5 [all a_i in (0.25, 0.5]] + 2 [all a_i in (0.3, 0.4)].
    x_i in {0, 7}: a = 0.5 (outer band only); x_i in {1, 6}: a = 5/14 ~ 0.357 (both bands); x_i = 2: a = 3/14 ~
    0.214 (none); x_i = 3: a = 1/14 (none)."""
    env = HyperGrid(ndim=2, height=8)
    got = env.log_reward(torch.tensor([x])).exp()
    assert abs(float(got) - reward) < 1e-12
    assert bool(env.modes(torch.tensor([x]))) == (reward == 2.6)


@pytest.mark.parametrize("height", [5, 8, 11, 16, 21, 31, 64])
def test_hypergrid_reward_is_exact_at_the_band_edges(height) -> None:
    """The bands' strict inequalities hold exactly, as in rational arithmetic: at H = 16, x_i = 3 and 12 have a =
    3/10, on the inner band's open edge, so (3, 3) and (12, 12) are not modes (R = 0.6), while (2, 2) (a = 11/30)
    is (R = 2.6); floating point puts 12/15 - 0.5 at 0.30000000000000004, inside the band."""
    from fractions import Fraction

    env = HyperGrid(ndim=2, height=height)
    x = env.all_states()

    def exact(v: int) -> tuple[bool, bool]:
        a = abs(Fraction(v, height - 1) - Fraction(1, 2))
        return Fraction(1, 4) < a <= Fraction(1, 2), Fraction(3, 10) < a < Fraction(2, 5)

    bands = [[exact(int(v)) for v in row] for row in x]
    want = torch.tensor([0.1 + 0.5 * all(b[0] for b in row) + 2.0 * all(b[1] for b in row) for row in bands],
                        dtype=torch.float64)
    assert torch.allclose(env.reward(x), want, rtol=0, atol=1e-15)
    if height == 16:
        assert float(env.reward(torch.tensor([[3, 3]]))) == pytest.approx(0.6)
        assert float(env.reward(torch.tensor([[2, 2]]))) == pytest.approx(2.6)
        assert float(env.reward(torch.tensor([[12, 12]]))) == pytest.approx(0.6)


def test_hypergrid_modes_and_log_z() -> None:
    """H = 8, D = 2: per axis the outer band is {0, 1, 6, 7} and the inner band {1, 6}, so 16 states get R1, the
    4 modes {1, 6}^2 also get R2, and Z = 64 * 0.1 + 16 * 0.5 + 4 * 2 = 22.4."""
    env = HyperGrid(ndim=2, height=8)
    states = env.all_states()
    assert int(env.modes(states).sum()) == 4
    assert abs(exact_log_z(env) - math.log(22.4)) < 1e-12


def test_a_mask_of_the_wrong_shape_is_a_shape_error() -> None:
    """A user environment whose forward_mask drops a column is caught when a policy rolls it out (ShapeError
    naming forward_mask), and masked_log_softmax refuses a mask that does not match the logits."""
    from genkit.models.gflownet import Policy, sample_trajectories
    from genkit.models.gflownet.policy import masked_log_softmax

    class Narrow(HyperGrid):
        def forward_mask(self, states):
            return super().forward_mask(states)[:, 1:]

    env = Narrow(ndim=2, height=4)
    policy = Policy(env.input_dim, env.n_actions, env.n_backward, hidden=8)
    with pytest.raises(ShapeError, match="forward_mask"):
        sample_trajectories(env, policy, 3)
    with pytest.raises(ShapeError):
        masked_log_softmax(torch.zeros(3, 3), torch.ones(3, 2, dtype=torch.bool))
