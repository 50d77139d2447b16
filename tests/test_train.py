"""genkit.train: exact resume, non-finite policies, data checks, config validation, and real 2-process DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import genkit
from genkit import checkpoint
from genkit.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, TrainingInterrupted
from genkit.models import FAMILIES
from genkit.train import LogRecord, TrainConfig, Trainer

FAMILY = "test-train-denoiser"
REPO = Path(__file__).resolve().parents[1]


class TinyDenoiser(nn.Module):
    """Flow-matching style loss with dropout: uses both the step generator and the global RNG."""

    def __init__(self, dim: int = 2, hidden: int = 16, nan_calls: tuple[int, ...] = (),
                 nan_grad_calls: tuple[int, ...] = ()):
        super().__init__()
        self.dim, self.hidden, self.calls = dim, hidden, 0
        self.nan_calls, self.nan_grad_calls = tuple(nan_calls), tuple(nan_grad_calls)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Dropout(0.2), nn.Linear(hidden, dim))

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        self.calls += 1
        eps = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
        t = torch.rand(batch.shape[0], 1, generator=generator, device=batch.device, dtype=batch.dtype)
        v = self.net(torch.cat([(1 - t) * batch + t * eps, t], dim=1))
        loss = (v - (eps - batch)).pow(2).mean()
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        if self.calls in self.nan_grad_calls:  # finite loss, NaN gradient: d/dw sqrt(w - w) = inf - inf
            w = self.net[0].weight
            loss = loss + torch.sqrt(w - w).sum()
        return loss, {"t_mean": float(t.mean())}

    def config(self) -> dict:
        return {"family": FAMILY, "dim": self.dim, "hidden": self.hidden}

    @classmethod
    def from_config(cls, config: dict) -> TinyDenoiser:
        return cls(config["dim"], config["hidden"])


FAMILIES.register(FAMILY)(TinyDenoiser)
DATA = torch.randn(40, 2, generator=torch.Generator().manual_seed(7)) * torch.tensor([1.0, 0.3])


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def make(seed: int = 0, **kwargs) -> TinyDenoiser:
    torch.manual_seed(seed)
    return TinyDenoiser(**kwargs)


def cfg(out_dir: Path | str, **changes) -> TrainConfig:
    base = dict(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.9,
                checkpoint_every=6, log_every=2, weight_decay=0.01, out_dir=str(out_dir), progress=False, cpu=True)
    return TrainConfig(**{**base, **changes})


def _reset() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


class Interrupt(Exception):
    pass


def test_resume_is_exactly_the_uninterrupted_run(tmp_path: Path) -> None:
    full_model = make(0)
    full = Trainer(full_model, cfg(tmp_path / "full")).fit(DATA)  # 40 samples / 8 = 5 steps per epoch
    assert [s for s, _ in full.losses] == [2, 4, 6, 8, 10, 12]

    seen: list[LogRecord] = []

    def stop_at_6(trainer: Trainer, record: LogRecord) -> None:
        seen.append(record)
        if record.step == 6:
            raise Interrupt  # after the step-6 checkpoint, like a preempted job

    _reset()
    with pytest.raises(Interrupt):
        Trainer(make(0), cfg(tmp_path / "cut"), callbacks=[stop_at_6]).fit(DATA)
    _reset()
    resumed_model = make(3)  # different init: everything must come from the checkpoint
    resumed = Trainer(resumed_model, cfg(tmp_path / "cut")).fit(DATA)

    assert [(r.step, r.loss) for r in seen] + resumed.losses == full.losses
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.ema is not None and resumed.ema is not None
    for key in full.ema:
        assert full.ema[key].dtype == torch.float32 and torch.equal(full.ema[key], resumed.ema[key]), key
    steps = [[json.loads(line)["step"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("full", "cut")]
    assert steps[0] == steps[1] == [2, 4, 6, 8, 10, 12]
    ema_model = genkit.load(tmp_path / "cut" / "checkpoint")
    for key, value in ema_model.state_dict().items():
        assert torch.equal(value, full.ema[key]), key


class SignalledDenoiser(TinyDenoiser):
    """Sends this process ``signum`` during loss call ``at``, as a scheduler's preemption would mid-step."""

    def __init__(self, at: int, signum: int):
        super().__init__()
        self.at, self.signum = at, signum

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        if self.calls + 1 == self.at:
            os.kill(os.getpid(), self.signum)
        return super().loss(batch, generator)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_reached_and_resume_is_exact(tmp_path: Path, signum: int) -> None:
    full_model = make(0)
    full = Trainer(full_model, cfg(tmp_path / "full")).fit(DATA)
    _reset()
    before = signal.getsignal(signum)
    torch.manual_seed(0)
    cut_model = SignalledDenoiser(at=7, signum=signum)  # step 7: no checkpoint is due (every 6)
    with pytest.raises(TrainingInterrupted, match=rf"{signal.Signals(signum).name} .*at step 7 of 12") as err:
        Trainer(cut_model, cfg(tmp_path / "cut")).fit(DATA)
    assert err.value.step == 7 and checkpoint.read_trainer_state(err.value.checkpoint)["step"] == 7
    assert signal.getsignal(signum) is before  # the trainer's handler is gone
    _reset()
    resumed_model = make(3)
    resumed = Trainer(resumed_model, cfg(tmp_path / "cut")).fit(DATA)
    assert resumed.losses == full.losses[3:]  # the step-8 log averages steps 7 (before the signal) and 8
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_dataloader_workers_leave_signals_to_the_trainer(tmp_path: Path) -> None:
    """Ctrl-C / a scheduler signal the whole process group: workers must not die before the checkpoint is saved."""
    from genkit.cli import run_main
    from genkit.train import _Batches

    class SignalState(Dataset):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> torch.Tensor:
            ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]
            return torch.tensor([float(all(ignored)), float(os.getpid())])

    batches = _Batches(SignalState(), cfg(tmp_path, batch_size=4, num_workers=1), world=1, rank=0)
    got = torch.cat(list(batches.iterate(0, 4, torch.device("cpu"))))
    assert (got[:, 0] == 1).all() and (got[:, 1] != os.getpid()).all()  # read in a worker that ignores them
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # the training process itself still hears them

    def interrupted(argv):
        raise TrainingInterrupted("stopped", 3, None, signal.SIGTERM)

    assert run_main(interrupted, []) == 128 + signal.SIGTERM  # a script exits as the shell expects


def test_resume_with_other_settings_is_an_error_unless_allowed(tmp_path: Path, caplog) -> None:
    Trainer(make(0), cfg(tmp_path, steps=6)).fit(DATA)
    _reset()
    with pytest.raises(ConfigError, match=r"other settings \(lr 0.01 there, 0.02 now; seed 0 there, 1 now\).*"
                                          r"allow_new_settings=True"):
        Trainer(make(0), cfg(tmp_path, steps=8, lr=2e-2, seed=1)).fit(DATA)
    _reset()
    with pytest.raises(ConfigError, match=r"ema_decay 0.9 there, None now"):  # would drop the saved EMA
        Trainer(make(0), cfg(tmp_path, steps=8, ema_decay=None)).fit(DATA)
    _reset()
    records: list[LogRecord] = []
    with caplog.at_level("WARNING", logger="genkit.train"):
        trainer = Trainer(make(0), cfg(tmp_path, steps=8, lr=2e-2, weight_decay=0.5),
                          callbacks=[lambda t, r: records.append(r)])
        result = trainer.fit(DATA, allow_new_settings=True)
    assert result.step == 8 and "new settings: lr 0.01 there, 0.02 now" in caplog.text
    assert "steps changed from 6 to 8" in caplog.text  # the LR schedule is recomputed: said, not silent
    assert "the LR moves from 0.001 to" in caplog.text  # from the saved run's last LR (0.1 x 0.01), not the new one
    # the new settings are the ones used (the loaded optimizer state carried the old ones)
    assert records[-1].lr == pytest.approx(2e-2 * 0.1)  # cosine down to min_lr_ratio * the new lr
    assert trainer.scheduler.base_lrs == [2e-2] * len(trainer.optimizer.param_groups)
    assert sorted(g["weight_decay"] for g in trainer.optimizer.param_groups) == [0.0, 0.5]


def test_callback_log_record_and_schedule(tmp_path: Path) -> None:
    records: list[LogRecord] = []
    result = Trainer(make(), cfg(tmp_path, steps=10, log_every=1, checkpoint_every=None),
                     callbacks=[lambda t, r: records.append(r)]).fit(DATA)
    lrs = [r.lr for r in records]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)  # linear warm-up over 2 steps
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(1e-3)  # cosine to 0.1 * lr
    assert all(r.is_main_process and "t_mean" in r.logs and r.samples_per_s > 0 for r in records)
    assert result.step == 10 and result.checkpoint == tmp_path / "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    model = make(nan_calls=(8,))
    with pytest.raises(NonFiniteLossError, match=r"step 8 .*lower lr.*nonfinite='skip'"):
        Trainer(model, cfg(tmp_path)).fit(DATA)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    loaded = genkit.load(tmp_path / "checkpoint", ema=False)
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]


def test_nan_gradient_stops(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at step 2 "):
        Trainer(make(nan_grad_calls=(2,)), cfg(tmp_path)).fit(DATA)


def test_nan_loss_skip_counts_and_continues(tmp_path: Path) -> None:
    model = make(nan_calls=(3, 5), nan_grad_calls=(9,))
    result = Trainer(model, cfg(tmp_path, nonfinite="skip", grad_clip=None)).fit(DATA)
    assert result.step == 12 and result.skipped == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped"] == 3


def test_skip_stops_after_patience_and_logs_json_null(tmp_path: Path) -> None:
    model = make(nan_calls=tuple(range(5, 40)))
    with pytest.raises(NonFiniteLossError, match=r"step 7, 3 such steps in a row \(nonfinite_patience=3\): the run "
                                                 r"has diverged.*checkpoint .* is intact"):
        Trainer(model, cfg(tmp_path, nonfinite="skip", nonfinite_patience=3, log_every=1)).fit(DATA)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss"] is None and rows[-1]["skipped"] == 2


def test_nan_in_tensor_data(tmp_path: Path) -> None:
    data = DATA.clone()
    data[17, 1] = float("inf")
    with pytest.raises(DataError, match="first in sample 17"):
        Trainer(make(), cfg(tmp_path)).fit(data)
    assert not (tmp_path / "checkpoint").exists()


class Rows(Dataset):
    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def test_dataset_path_matches_tensor_path_and_checks_batches(tmp_path: Path) -> None:
    a, b = make(0), make(0)
    ra = Trainer(a, cfg(tmp_path / "t", steps=4)).fit(DATA)
    _reset()
    rb = Trainer(b, cfg(tmp_path / "d", steps=4, num_workers=1)).fit(Rows(DATA))
    assert ra.losses == rb.losses and all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    data = DATA.clone()
    data[3, 0] = float("nan")
    _reset()
    with pytest.raises(DataError, match=r"batch of step \d+ contains NaN/inf"):
        Trainer(make(), cfg(tmp_path / "bad", steps=12, nonfinite="skip")).fit(Rows(data))


def test_too_little_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than one global batch"):
        Trainer(make(), cfg(tmp_path, batch_size=64)).fit(DATA)


def test_bf16_keeps_ema_in_fp32(tmp_path: Path) -> None:
    result = Trainer(make(), cfg(tmp_path, steps=4, mixed_precision="bf16", checkpoint_every=None)).fit(DATA)
    assert all(v.dtype == torch.float32 for v in result.ema.values())
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("batch_size", -1), ("batch_size", 2.5), ("lr", 0.0), ("lr", float("nan")),
    ("weight_decay", -0.1), ("betas", (0.9,)), ("betas", (1.0, 0.9)), ("warmup_steps", 100),
    ("min_lr_ratio", 1.5), ("grad_clip", 0.0), ("ema_decay", 1.0), ("ema_decay", -0.5),
    ("mixed_precision", "fp8"), ("seed", -1), ("checkpoint_every", 0), ("log_every", True),
    ("out_dir", ""), ("nonfinite", "ignore"), ("num_workers", -2), ("progress", "yes"),
])
def test_bad_config_values(tmp_path: Path, field: str, value) -> None:
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{field}="):
        cfg(**{"out_dir": tmp_path, field: value})


def test_config_dict_round_trip_and_unknown_keys(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    assert TrainConfig.from_dict(c.to_dict()) == TrainConfig(**{**c.to_dict(), "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"step": 10})


def test_misuse_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs an nn.Module with loss"):
        Trainer(nn.Linear(2, 2), cfg(tmp_path))
    checkpoint.save(tmp_path / "checkpoint", make())  # weights only: resuming from it is impossible
    with pytest.raises(ConfigError, match="holds no resume state"):
        Trainer(make(), cfg(tmp_path)).fit(DATA)


def test_resume_from_another_directory(tmp_path: Path) -> None:
    Trainer(make(), cfg(tmp_path / "a", steps=6)).fit(DATA)
    _reset()
    with pytest.raises(CheckpointError, match="holds no checkpoint with a resume state"):
        Trainer(make(), cfg(tmp_path / "b")).fit(DATA, resume_from=tmp_path / "nowhere")
    _reset()
    result = Trainer(make(), cfg(tmp_path / "b")).fit(DATA, resume_from=tmp_path / "a" / "checkpoint")
    assert [s for s, _ in result.losses] == [8, 10, 12] and result.checkpoint == tmp_path / "b" / "checkpoint"
    assert json.loads((result.checkpoint / "trainer_state.json").read_text())["step"] == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {  # the two launch lines README.md and train/train.py give; both start 2 CPU processes over gloo here
    "torchrun": lambda port: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port],
    "accelerate": lambda port: ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                                "--main_process_port", port],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_keep_identical_parameters(tmp_path: Path, launcher: str) -> None:
    import dist_train_script as script
    from safetensors.torch import load_file

    out, params = tmp_path / "run", tmp_path / "params"
    params.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    onestep = ["onestep"] if launcher == "torchrun" else []  # the one-step families under one launcher only
    cmd = [sys.executable, *LAUNCHERS[launcher](str(_free_port())), str(Path(script.__file__)), str(out), str(params),
           *onestep]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (load_file(str(params / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0["seen"].item() != r1["seen"].item()  # each rank trained on different data...
    for key in r0:
        if key != "seen":
            assert torch.equal(r0[key], r1[key]), key  # ...yet parameters, EMA, losses and skips agree
    assert r0["skipped"].item() == 1  # rank 1's NaN made both ranks skip the same step
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]  # rank 0 only, no temp dirs

    # The gradient really is the global-batch gradient: one process with the doubled batch lands on the same point.
    _reset()
    ref = script.make_model(nan_calls=(2,))
    script_cfg = script.config(str(tmp_path / "single"), batch_size=8)
    Trainer(ref, script_cfg).fit(script.make_data())
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(r0[f"param.{name}"], value, rtol=1e-5, atol=1e-6)
    loaded = genkit.load(out / "checkpoint", ema=False)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, r0[f"param.{name}"]), name

    # Accumulating 2 micro-batches of 2 on each of 2 ranks (no DDP sync on the first) is the global batch of 8 of
    # one process: the same rows (k * A + i indexing), the same mean gradient, the same parameters and losses.
    a0, a1 = (load_file(str(params / f"accum{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(a0[k], a1[k]) for k in a0 if k != "seen") and a0["seen"].item() != a1["seen"].item()
    _reset()
    ref = script.make_model()
    result = Trainer(ref, script.config(str(tmp_path / "single-accum"), batch_size=8)).fit(script.make_data())
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(a0[f"param.{name}"], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a0["losses"], torch.tensor([x for _, x in result.losses], dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    assert float(a0["seen"] + a1["seen"]) == pytest.approx(ref.seen, rel=1e-9)
    g0, g1 = (load_file(str(params / f"gameaccum{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(g0[k], g1[k]) for k in g0 if k != "seen") and g0["seen"].item() != g1["seen"].item()
    assert checkpoint.read_trainer_state(tmp_path / "run-gameaccum")["step"] == 9

    # The same launch trained the data-free objective and the alternating two-optimizer one (batch source).
    for kind, run in (("free", "run-free"), ("game", "run-game")):
        a, b = (load_file(str(params / f"{kind}{r}.safetensors")) for r in (0, 1))
        assert a["seen"].item() != b["seen"].item(), kind  # each rank drew its own samples...
        assert set(a) == set(b) and any(k.startswith("ema.") for k in a)
        for key in a:
            if key != "seen":
                assert torch.equal(a[key], b[key]), (kind, key)  # ...yet every tensor agrees
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == ["checkpoint", "metrics.jsonl"], kind
        state = checkpoint.read_trainer_state(tmp_path / run)
        assert state["step"] == 9 and state["world_size"] == 2
        weights = genkit.load(tmp_path / run, ema=False).state_dict()  # the model alone, as rank 0 had it
        assert weights and all(torch.equal(v, a[f"param.model.{k}"]) for k, v in weights.items()), kind
    game_ckpt = tmp_path / "run-game" / "checkpoint"
    assert {"optimizer.gen.json", "optimizer.critic.json", "scheduler.gen.json", "objective.safetensors"} <= {
        p.name for p in game_ckpt.iterdir()}

    if not onestep:
        return
    # ... and the one-step families: MeanFlow (its JVP inside the DDP-wrapped loss) and SMD (two alternating
    # optimizers, 5 score updates per generator update: DDP finds the unused half of the parameters each step).
    for kind in ("meanflow", "smd", "smdcut"):
        a, b = (load_file(str(params / f"{kind}{r}.safetensors")) for r in (0, 1))
        for key in a:
            if key != "seen":
                assert torch.equal(a[key], b[key]), (kind, key)  # every tensor agrees across ranks
    mf0, mf1 = (load_file(str(params / f"meanflow{r}.safetensors")) for r in (0, 1))
    assert mf0["seen"].item() != mf1["seen"].item()  # each rank trained on its own part of the data
    from genkit.models import SMD, MeanFlow

    start = MeanFlow.example()[0].state_dict()
    assert any(not torch.equal(mf0[f"param.{k}"], v) for k, v in start.items())  # it trained
    loaded = genkit.load(tmp_path / "run-meanflow", ema=False)
    assert all(torch.equal(v, mf0[f"param.{k}"]) for k, v in loaded.state_dict().items())
    # the SMD run cut after step 4 (inside the score updates) and resumed by a fresh trainer from another init
    # ends bit for bit where the uninterrupted one does, EMA and logged losses included
    full, cut = (load_file(str(params / f"{kind}0.safetensors")) for kind in ("smd", "smdcut"))
    assert set(full) == set(cut) and all(torch.equal(full[k], cut[k]) for k in full if k != "losses"), "resume"
    assert torch.equal(full["losses"][-2:], cut["losses"][-2:])
    assert [SMD.example()[0].update(k) for k in range(6)] == ["score"] * 5 + ["generator"]
    state = checkpoint.read_trainer_state(tmp_path / "run-smd")
    assert state["step"] == 12 and state["world_size"] == 2


def test_alternating_optimizers_under_ddp_need_an_accelerator_that_finds_unused_parameters() -> None:
    """Each update of an objective with several optimizers leaves the others' parameters without gradient; DDP
    refuses that unless it finds unused parameters: the trainer's own accelerator does, a user's must."""
    from types import SimpleNamespace

    from dist_train_script import Game

    from genkit.train.config import alternates, check_accelerator

    acc = SimpleNamespace(mixed_precision="no", gradient_accumulation_steps=1, num_processes=2,
                          distributed_type=SimpleNamespace(value="MULTI_CPU"), ddp_handler=None)
    assert alternates(Game()) and not alternates(make())
    check_accelerator(acc, TrainConfig(), make())  # one optimizer: fine
    with pytest.raises(ConfigError, match=r"alternates optimizers \['critic', 'gen'\].*make_accelerator\(config, "
                                          r"objective\).*find_unused_parameters=True"):
        check_accelerator(acc, TrainConfig(), Game())
    acc.ddp_handler = SimpleNamespace(find_unused_parameters=True)
    check_accelerator(acc, TrainConfig(), Game())


# --- objectives: data-free, batch sources, several optimizers, frozen parts, token tensors -------------------
def _interrupted_then_resumed(make_objective, config, data=None, stop: int = 6, **fit):
    """Run ``config`` uninterrupted, and again cut after the step-``stop`` checkpoint then resumed from a fresh
    objective of another init; returns both objectives and results."""
    def run(out, callbacks=(), seed=0):
        torch.manual_seed(seed)
        objective = make_objective()
        trainer = Trainer(objective, config(out), callbacks=callbacks)
        return objective, trainer, trainer.fit(data, **fit)

    full, full_trainer, full_result = run("full")

    def cut(trainer: Trainer, record: LogRecord) -> None:
        if record.step == stop:
            raise Interrupt

    _reset()
    with pytest.raises(Interrupt):
        run("cut", [cut])
    _reset()
    resumed, resumed_trainer, resumed_result = run("cut", seed=3)
    assert resumed_result.losses == [x for x in full_result.losses if x[0] > stop]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # the model and the objective's own tensors, bit for bit
    assert set(full_result.ema) == set(full_trainer.model.state_dict())  # the EMA covers the model only
    for key in full_result.ema:
        assert torch.equal(full_result.ema[key], resumed_result.ema[key]), key
    return (full, full_trainer, full_result), (resumed, resumed_trainer, resumed_result)


def test_data_free_objective_resumes_exactly(tmp_path: Path) -> None:
    from dist_train_script import ReverseKL, objective_config

    (full, trainer, result), _ = _interrupted_then_resumed(
        ReverseKL, lambda out: objective_config(str(tmp_path / out), steps=12), stop=6)
    assert [s for s, _ in result.losses] == [3, 6, 9, 12]
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]  # model: decay, no_decay; log_z at 100x
    assert len(lrs) == 2 and lrs[1] == 100 * lrs[0]
    ckpt = tmp_path / "full" / "checkpoint"
    assert sorted(genkit.load(ckpt, ema=False).state_dict()) == ["lin.bias", "lin.weight", "log_s", "mu"]
    from safetensors.torch import load_file
    own = load_file(str(ckpt / "objective.safetensors"))
    assert list(own) == ["log_z"] and torch.equal(own["log_z"], full.log_z.detach())


def test_resume_with_changed_parameter_groups_is_refused_or_applied(tmp_path: Path) -> None:
    from dist_train_script import ReverseKL, objective_config

    from genkit.objective import ParamGroup

    class Regrouped(ReverseKL):
        def param_groups(self) -> list[ParamGroup]:
            return [ParamGroup("model", list(self.model.parameters())),
                    ParamGroup("log_z", [self.log_z], lr_scale=1.0, weight_decay=0.5)]

    Trainer(ReverseKL(), objective_config(str(tmp_path), steps=3)).fit()
    saved = checkpoint.read_trainer_state(tmp_path)["optimizer_groups"]
    assert saved == {"main": [{"group": "model", "lr_scale": 1.0, "weight_decay": None, "params": 4},
                              {"group": "log_z", "lr_scale": 100.0, "weight_decay": 0.0, "params": 1}]}
    _reset()
    with pytest.raises(ConfigError, match=r"other optimizers or parameter groups.*'lr_scale': 100\.0.*"
                                          r"'lr_scale': 1\.0.*allow_new_settings=True"):
        Trainer(Regrouped(), objective_config(str(tmp_path), steps=6)).fit()
    _reset()  # allowed: the new lr_scale and weight decay are in force, not the checkpoint's
    trainer = Trainer(Regrouped(), objective_config(str(tmp_path), steps=6))
    trainer.fit(allow_new_settings=True)
    model_group, z_group = trainer.optimizer.param_groups[0], trainer.optimizer.param_groups[-1]
    assert z_group["initial_lr"] == model_group["initial_lr"] and z_group["weight_decay"] == 0.5


def test_resume_with_an_objective_of_other_settings_is_refused(tmp_path: Path) -> None:
    from dist_train_script import ReverseKL, objective_config

    class Sized(ReverseKL):
        def config(self) -> dict:
            return {"n": self.n}

    Trainer(Sized(n=16), objective_config(str(tmp_path), steps=3)).fit()
    assert checkpoint.read_trainer_state(tmp_path)["objective_config"] == {"n": 16}
    _reset()
    with pytest.raises(CheckpointError, match=r"trained by a Sized with other settings \(config differs in \['n'\]: "
                                              r"\{'n': 16\} there, \{'n': 8\} now\)"):
        Trainer(Sized(n=8), objective_config(str(tmp_path), steps=6)).fit()
    _reset()
    assert Trainer(Sized(n=16), objective_config(str(tmp_path), steps=6)).fit().step == 6


def test_batch_source_and_alternating_optimizers_resume_exactly(tmp_path: Path) -> None:
    from dist_train_script import Game, NormalSource, objective_config

    (full, trainer, result), (resumed, _, _) = _interrupted_then_resumed(
        Game, lambda out: objective_config(str(tmp_path / out), steps=12), data=NormalSource(), stop=6)
    assert full.updates == ["critic", "critic", "gen"] * 4  # update(step) picks the optimizer, passed as update=
    assert resumed.updates == ["critic", "critic", "gen"] * 2  # the resumed run did steps 7..12
    steps = {name: [int(s["step"]) for s in opt.state_dict()["state"].values()]
             for name, opt in trainer.optimizers.items()}
    assert steps == {"gen": [4, 4], "critic": [8]}  # each optimizer stepped only on its own steps
    assert trainer.ema.updates == 4  # the EMA (of the generator, the model) moves when the generator does
    lr = {name: s.get_last_lr()[0] for name, s in trainer.schedulers.items()}
    assert lr["gen"] == lr["critic"] == pytest.approx(1e-3)  # both schedules follow the step: at the end, min_lr
    # each logged key is averaged over the steps that reported it: the critic's over its 2 steps of every 3
    _reset()
    records: list[LogRecord] = []
    game = Game()
    Trainer(game, objective_config(str(tmp_path / "logs"), steps=6), callbacks=[lambda t, r: records.append(r)]).fit(
        NormalSource())
    for record, window in zip(records, (game.history[:3], game.history[3:])):
        (_, c1), (_, c2), (_, g) = window
        assert record.logs["critic_loss"] == (0.0 + c1 + c2) / 2 and record.logs["gen_loss"] == 0.0 + g
    # the batch of step k on rank r is the source's draw from a generator seeded by (seed, k, r) alone
    from genkit.train.batching import SOURCE, SourceBatches, derive_seed

    g = torch.Generator().manual_seed(derive_seed(0, SOURCE, 4, 1))
    batches = SourceBatches(NormalSource(), objective_config(str(tmp_path)), world=2, rank=1)
    assert torch.equal(next(batches.iterate(4, 5, torch.device("cpu"))), NormalSource().batch(4, 1, g))


def test_data_and_schedule_mistakes_are_named(tmp_path: Path) -> None:
    from dist_train_script import Game, NormalSource, ReverseKL, objective_config

    from genkit.models import FlowMatching
    from genkit.nets import MLP
    from genkit.objective import ParamGroup

    for objective in (make(), FlowMatching(MLP(2, hidden=8, depth=1), sample_shape=(2,))):
        _reset()
        with pytest.raises(DataError, match=rf"{type(objective).__name__} needs training data: pass fit\(data\) "
                                            r"with a Tensor .*a batch source .*data_free = True"):
            Trainer(objective, cfg(tmp_path / "a")).fit()
    assert not (tmp_path / "a").exists()
    _reset()
    with pytest.raises(ConfigError, match=r"ReverseKL declares data_free = True .* call fit\(\) without data"):
        Trainer(ReverseKL(), objective_config(str(tmp_path / "b"))).fit(DATA)

    class UnknownGroup(Game):
        def optimizers(self):
            return {"gen": ["gen"], "critic": ["critc"]}

    class UnknownOptimizer(Game):
        def update(self, step):
            return "disc"

    class NoSchedule(Game):
        update = None

    class Orphan(Game):
        def param_groups(self):
            return [ParamGroup("gen", [self.model.a]), ParamGroup("critic", [self.critic.weight])]

    _reset()
    with pytest.raises(ConfigError, match=r"names unknown parameter group 'critc'; known groups: \['critic', 'gen'\]"):
        Trainer(UnknownGroup(), objective_config(str(tmp_path / "c")))
    _reset()
    with pytest.raises(ConfigError, match=r"update\(0\) returned 'disc', not one of its optimizers "
                                          r"\['critic', 'gen'\]"):
        Trainer(UnknownOptimizer(), objective_config(str(tmp_path / "d"))).fit(NormalSource())
    _reset()
    with pytest.raises(ConfigError, match=r"declares optimizers \['critic', 'gen'\] but no update\(step\)"):
        Trainer(NoSchedule(), objective_config(str(tmp_path / "e")))
    _reset()
    with pytest.raises(ConfigError, match=r"1 trainable parameter\(s\) of Orphan are in no group \(shapes \[\(2,\)\]"):
        Trainer(Orphan(), objective_config(str(tmp_path / "f")))


class Distill(TinyDenoiser):
    """A student regressing a frozen teacher's output (no dropout: eval-mode teacher, deterministic)."""

    def __init__(self, teacher: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        from genkit.frozen import Frozen

        self.frozen = Frozen()
        if teacher is not None:
            self.frozen.set("teacher", teacher)

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        t = torch.rand(batch.shape[0], 1, generator=generator)
        x = torch.cat([batch, t], dim=1)
        with torch.no_grad():
            target = self.frozen.teacher.net(x)
        return (self.net(x) - target).pow(2).mean(), {}

    def config(self) -> dict:
        return {**super().config(), "family": FAMILY + "-distill"}


FAMILIES.register(FAMILY + "-distill")(Distill)


def distill(teacher: nn.Module | None = None) -> Distill:
    torch.manual_seed(0)
    return Distill(teacher)


def test_frozen_part_is_held_out_of_training_and_moves_with_the_module() -> None:
    from genkit.frozen import Frozen

    teacher = make(1)
    student = Distill(teacher)
    assert student.frozen.teacher is teacher and "teacher" in student.frozen
    assert not any(k.startswith("frozen") for k in student.state_dict())
    assert {id(p) for p in student.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    student.train()
    assert student.training and not teacher.training  # train() leaves the frozen part in eval mode
    student.double()
    assert all(p.dtype == torch.float64 for p in [*student.parameters(), *teacher.parameters()])
    trainer_params = {id(p) for g in Trainer(student, cfg("unused")).optimizer.param_groups for p in g["params"]}
    assert trainer_params == {id(p) for p in student.net.parameters()}  # the optimizer never sees the teacher
    with pytest.raises(ConfigError, match="identifier"):
        Frozen().set("a teacher", teacher)
    holder = Frozen()
    holder.reward = make(2)  # attribute assignment attaches a part too, never a submodule
    assert "reward" in holder and not list(holder.parameters()) and not holder.reward.net[0].weight.requires_grad


def test_frozen_teacher_is_reloaded_by_reference_and_a_changed_one_refused(tmp_path: Path) -> None:
    from genkit import frozen

    folder = tmp_path / "teacher"
    checkpoint.save(folder, make(1))
    teacher = genkit.load(folder)
    fp = checkpoint.fingerprint(folder)
    assert frozen.fingerprint(teacher) == fp and frozen.source_of(teacher) == str(folder.resolve())
    assert frozen.fingerprint(make(1)) == fp  # config + weights, wherever they come from; not the folder
    assert frozen.fingerprint(make(2)) != fp

    (full, _, _), _ = _interrupted_then_resumed(
        lambda: Distill(teacher), lambda out: cfg(tmp_path / out), data=DATA)
    state = checkpoint.read_trainer_state(tmp_path / "cut")
    assert state["frozen"] == {"frozen.teacher": {"source": str(folder.resolve()), "fingerprint": fp, "ema": False}}

    # cut again at step 6; every refusal below leaves that checkpoint as it is
    shutil.rmtree(tmp_path / "cut")
    _reset()
    with pytest.raises(Interrupt):
        Trainer(distill(teacher), cfg(tmp_path / "cut"), callbacks=[_stop_at(6)]).fit(DATA)
    other = make(2)
    new = frozen.fingerprint(other)
    refusals = [  # (objective, fit keywords, what the error says), each naming the part
        (Distill(), {}, r"frozen part 'frozen.teacher' from .*teacher; attach it .*frozen_loader=genkit.load"),
        (Distill(other), {}, rf"frozen part 'frozen.teacher' changed: .*fingerprint {fp} .*fingerprint {new}"),
        (Distill(teacher), {}, None),  # with an extra part: below
    ]
    refusals[2][0].frozen.set("extra", make(3))
    refusals[2] = (refusals[2][0], {}, r"trained without frozen part\(s\) \['frozen.extra'\]")
    for objective, kwargs, message in refusals:
        _reset()
        with pytest.raises(CheckpointError, match=message):
            Trainer(objective, cfg(tmp_path / "cut")).fit(DATA, **kwargs)
    checkpoint.save(folder, other)  # the teacher's folder now holds another model
    _reset()
    with pytest.raises(CheckpointError, match=rf"'frozen.teacher': .*teacher now holds fingerprint {new}, but the "
                                              rf"run was trained with fingerprint {fp}"):
        Trainer(Distill(), cfg(tmp_path / "cut")).fit(DATA, frozen_loader=genkit.load)
    checkpoint.save(folder, make(1))
    assert checkpoint.read_trainer_state(tmp_path / "cut")["step"] == 6

    # a resume given no teacher reloads it from the recorded folder: bit-exact with the uninterrupted run
    _reset()
    student = Distill()
    Trainer(student, cfg(tmp_path / "cut")).fit(DATA, frozen_loader=genkit.load)
    assert frozen.fingerprint(student.frozen.teacher) == fp
    for (name, a), b in zip(full.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_frozen_part_is_reloaded_with_the_weights_it_was_loaded_with(tmp_path: Path) -> None:
    """A teacher loaded with its raw weights (ema=False) from a folder that also holds EMA weights is recorded
    as such and reloaded with the raw weights (same fingerprint), not with genkit.load's default EMA ones."""
    from genkit import frozen

    folder = tmp_path / "teacher"
    checkpoint.save(folder, make(1), ema=make(2).state_dict())
    raw, ema = genkit.load(folder, ema=False), genkit.load(folder)
    records = frozen.Frozen(teacher=raw, other=ema).records()
    assert (records["teacher"]["ema"], records["other"]["ema"]) == (False, True)
    assert records["teacher"]["fingerprint"] == checkpoint.fingerprint(folder, ema=False) != checkpoint.fingerprint(
        folder)
    again = frozen.reload(records["teacher"], genkit.load, "teacher")
    assert frozen.fingerprint(again) == records["teacher"]["fingerprint"] and frozen.ema_of(again) is False
    for a, b in zip(again.state_dict().values(), raw.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="now holds fingerprint"):  # a loader that cannot ask for raw weights
        frozen.reload(records["teacher"], lambda source: genkit.load(source), "teacher")


def test_a_frozen_part_not_from_a_checkpoint_is_recorded_by_fingerprint(tmp_path: Path) -> None:
    from genkit import frozen
    from genkit.analytic import Gaussian
    from genkit.paths import get_path

    g = Gaussian(torch.ones(2), torch.eye(2) * 0.25, get_path("linear"))
    holder = frozen.Frozen(field=g)
    same = Gaussian(torch.ones(2), torch.eye(2) * 0.25, get_path("linear"))
    moved = Gaussian(torch.ones(2) * 1.5, torch.eye(2) * 0.25, get_path("linear"))
    assert holder.records() == {"field": {"source": None, "fingerprint": frozen.fingerprint(same), "ema": None}}
    assert frozen.fingerprint(moved) != frozen.fingerprint(g)
    with pytest.raises(CheckpointError, match=r"'field' was not loaded from a checkpoint .*attach the same part"):
        frozen.reload({"source": None, "fingerprint": "ab"}, genkit.load, "field")


def _stop_at(step: int):
    def stop(trainer: Trainer, record: LogRecord) -> None:
        if record.step == step:
            raise Interrupt
    return stop


VOCAB, MASK = 11, 11


class MaskedTokens(nn.Module):
    """A tiny masked-token model on LongTensor data ``[B, L]``: each token is masked with probability ``t``."""

    def __init__(self, length: int = 4):
        super().__init__()
        self.length = length
        self.emb = nn.Embedding(VOCAB + 1, 8)
        self.out = nn.Linear(9, VOCAB)
        self.register_buffer("counts", torch.zeros(VOCAB, dtype=torch.long))  # integer state: tokens seen

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        from genkit.paths import broadcast_time

        assert batch.dtype == torch.long
        self.counts += torch.bincount(batch.flatten(), minlength=VOCAB)
        t = broadcast_time(torch.rand((), generator=generator).item(), batch)  # [B] floats from integer x
        masked = torch.rand(batch.shape, generator=generator) < t[:, None]
        x = torch.where(masked, torch.full_like(batch, MASK), batch)
        h = torch.cat([self.emb(x), t[:, None, None].expand(*x.shape, 1)], dim=-1)
        ce = nn.functional.cross_entropy(self.out(h).flatten(0, 1), batch.flatten(), reduction="none")
        return (ce * masked.flatten()).sum() / masked.sum().clamp(min=1), {}

    def config(self) -> dict:
        return {"family": "test-train-tokens", "length": self.length}

    @classmethod
    def from_config(cls, config: dict) -> MaskedTokens:
        return cls(config["length"])


FAMILIES.register("test-train-tokens")(MaskedTokens)
TOKENS = torch.randint(0, VOCAB, (40, 4), generator=torch.Generator().manual_seed(3))


def test_token_tensors_train_resume_and_load_exactly(tmp_path: Path) -> None:
    (full, _, result), _ = _interrupted_then_resumed(MaskedTokens, lambda out: cfg(tmp_path / out), data=TOKENS)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    # 12 steps of 8 rows: 2 epochs (5 batches, every row once) and batches 10, 11 of the third epoch's permutation
    from genkit.train.batching import TensorBatches

    third = TensorBatches(TOKENS, cfg(tmp_path), world=1, rank=0)
    extra = TOKENS[torch.cat([third.indices(10), third.indices(11)])]
    assert torch.equal(full.counts, 2 * torch.bincount(TOKENS.flatten(), minlength=VOCAB)
                       + torch.bincount(extra.flatten(), minlength=VOCAB))
    assert result.ema["counts"].dtype == torch.long and torch.equal(result.ema["counts"], full.counts)  # copied
    for ema in (False, True):
        loaded = genkit.load(tmp_path / "cut", ema=ema)
        assert loaded.counts.dtype == torch.long and torch.equal(loaded.counts, full.counts)
    loaded = genkit.load(tmp_path / "cut", ema=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), full.state_dict().values()))


def test_broadcast_time_takes_its_dtype_from_a_float_reference() -> None:
    from genkit.errors import ShapeError
    from genkit.paths import broadcast_time

    tokens = torch.zeros(3, 5, dtype=torch.long)
    assert torch.equal(broadcast_time(0.7, tokens), torch.full((3,), 0.7))  # was tensor([0, 0, 0])
    assert broadcast_time(0.7, tokens, dtype=torch.float64).dtype == torch.float64
    t64 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    assert broadcast_time(t64, tokens) is t64  # a float t is its own reference
    x64 = torch.zeros(3, 2, dtype=torch.float64)
    assert broadcast_time(0.7, x64).dtype == torch.float64 and broadcast_time(t64, x64) is t64  # float x: as before
    assert broadcast_time(t64, torch.zeros(3, 2)).dtype == torch.float32
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert broadcast_time(0.7, tokens).dtype == torch.float64
    finally:
        torch.set_default_dtype(default)
    with pytest.raises(ShapeError, match="not a floating-point dtype"):
        broadcast_time(0.7, tokens, dtype=torch.long)


def test_a_class_conditional_model_with_class_dropout_resumes_exactly(tmp_path: Path) -> None:
    from genkit.data import LabelledData
    from genkit.models import FlowMatching
    from genkit.nets import MLP

    labels = (DATA[:, 0] > 0).long() + (DATA[:, 1] > 0).long()  # 3 classes
    data = LabelledData(DATA, labels, class_names=["low", "mid", "high"])

    def make_conditional() -> FlowMatching:  # the dropout is drawn from the step's loss generator
        return FlowMatching(MLP(2, hidden=16, depth=1, time_dim=8, num_classes=4), num_classes=3,
                            class_names=data.class_names, class_dropout=0.3)

    (full, _, result), _ = _interrupted_then_resumed(make_conditional, lambda out: cfg(tmp_path / out), data=data)
    assert [s for s, _ in result.losses] == [2, 4, 6, 8, 10, 12]
    import genkit

    loaded = genkit.load(tmp_path / "cut", ema=False)
    assert (loaded.num_classes, loaded.null_label, loaded.class_names) == (3, 3, ["low", "mid", "high"])
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), full.state_dict().values()))


def _split_linreg():
    """dist_train_script.LinReg with two optimizers: the weight on steps 0, 1, 3, 4, ..., the bias on 2, 5, ..."""
    from dist_train_script import LinReg

    from genkit.objective import ParamGroup

    class SplitLinReg(LinReg):
        updates: list

        def param_groups(self):
            return [ParamGroup("w", [self.lin.weight]), ParamGroup("b", [self.lin.bias])]

        def optimizers(self):
            return {"w": ["w"], "b": ["b"]}

        def update(self, step: int) -> str:
            return "b" if step % 3 == 2 else "w"

        def loss(self, batch, generator=None, update=None):
            self.updates = [*getattr(self, "updates", []), update]
            return super().loss(batch, generator)

    return SplitLinReg()


@pytest.mark.parametrize("split", [False, True])
def test_accumulated_micro_batches_are_one_big_batch(tmp_path: Path, split: bool) -> None:
    """A deterministic regression: 3 micro-batches of 4 per step give, step for step, the parameters, EMA, LR
    schedule, logged loss and logs of one batch of 12 (the same rows: micro-batch i of step k is batch 3k + i),
    with the gradient clipped once per optimizer step (the clip is active: the first grad norm is above it), for
    one optimizer and for two alternating ones."""
    from dist_train_script import LinReg, make_data

    data = make_data(96)
    runs = {}
    for micro, size in ((1, 12), (3, 4)):
        _reset()
        torch.manual_seed(0)
        model = _split_linreg() if split else LinReg()
        c = cfg(tmp_path / f"a{micro}", steps=4, batch_size=size, gradient_accumulation_steps=micro, grad_clip=0.5,
                log_every=1, checkpoint_every=None)
        trainer = Trainer(model, c)
        entered = []
        no_sync = trainer.accelerator.no_sync

        def counting(module, no_sync=no_sync, entered=entered, wrapped=trainer._forward):
            entered.append(module is wrapped)  # the DDP gradient sync is skipped on all micro-batches but the last
            return no_sync(module)

        trainer.accelerator.no_sync = counting
        result = trainer.fit(data)
        assert entered == [True] * (4 * (micro - 1))
        rows = [json.loads(line) for line in (tmp_path / f"a{micro}" / "metrics.jsonl").read_text().splitlines()]
        runs[micro] = (model, result, rows, trainer)
    (big, rb, rows_b, tb), (acc, ra, rows_a, ta) = runs[1], runs[3]
    assert big.calls == 4 and acc.calls == 12 and ra.step == rb.step == 4
    for name, value in big.state_dict().items():
        torch.testing.assert_close(acc.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ra.ema[name], rb.ema[name], rtol=1e-5, atol=1e-6)
    assert big.seen == pytest.approx(acc.seen, rel=1e-12)  # the same rows
    assert rows_b[0]["grad_norm"] > 0.5  # the clip acts, so clipping per micro-batch would differ
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        for key in ("loss", "mse", "grad_norm"):  # mse: each micro-batch's, averaged over the step
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
        assert a["samples_per_s"] > 0
    if split:
        assert acc.updates == [u for u in big.updates for _ in range(3)] == ["w"] * 6 + ["b"] * 3 + ["w"] * 3
        assert all(s.last_epoch == 4 for s in ta.schedulers.values())
    else:
        assert ta.scheduler.last_epoch == tb.scheduler.last_epoch == 4


def test_accumulation_settings_are_checked_and_part_of_the_resume_state(tmp_path: Path) -> None:
    from genkit.train import resume_changes

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
            cfg(tmp_path, gradient_accumulation_steps=bad)
    assert resume_changes(cfg(tmp_path).to_dict(), cfg(tmp_path, gradient_accumulation_steps=2)) == {
        "gradient_accumulation_steps": (1, 2)}
    from types import SimpleNamespace

    from genkit.train.config import check_accelerator

    acc = SimpleNamespace(mixed_precision="no", gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match=r"TrainConfig\(gradient_accumulation_steps=4\)"):
        check_accelerator(acc, cfg(tmp_path))


def test_a_non_finite_micro_batch_drops_the_whole_step(tmp_path: Path) -> None:
    """With 2 micro-batches a step, a NaN loss on loss call 3 (the first micro-batch of step 2, already
    backpropagated when the step's one collective sees it) drops step 2: its weights are step 1's."""
    weights = []

    def keep(trainer: Trainer, record: LogRecord) -> None:
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    model = make(0, nan_calls=(3,))
    result = Trainer(model, cfg(tmp_path, steps=4, gradient_accumulation_steps=2, nonfinite="skip", log_every=1),
                     callbacks=[keep]).fit(DATA)
    assert result.skipped == 1 and model.calls == 8
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[0])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_accumulated_run_resumes_exactly(tmp_path: Path) -> None:
    """TinyDenoiser (dropout: the global RNG, and the step generator) with 2 micro-batches a step, cut after the
    step-6 checkpoint and resumed by a fresh trainer from another init: bit for bit the uninterrupted run (the
    micro-batches and their generators are a function of k * A + i, 40 rows = 2.5 steps an epoch)."""
    c = dict(gradient_accumulation_steps=2, checkpoint_every=6)
    full_model = make(0)
    full = Trainer(full_model, cfg(tmp_path / "full", **c)).fit(DATA)
    assert full_model.calls == 24

    def stop_at_6(trainer: Trainer, record: LogRecord) -> None:
        if record.step == 6:
            raise Interrupt

    _reset()
    with pytest.raises(Interrupt):
        Trainer(make(0), cfg(tmp_path / "cut", **c), callbacks=[stop_at_6]).fit(DATA)
    _reset()
    resumed_model = make(3)
    resumed = Trainer(resumed_model, cfg(tmp_path / "cut", **c)).fit(DATA)
    assert resumed_model.calls == 12 and resumed.losses == full.losses[3:]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(full.ema[k], resumed.ema[k]) for k in full.ema)
