"""genkit.checkpoint: safetensors + JSON round trips, EMA by default, clear errors, atomic saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import genkit
from genkit import checkpoint
from genkit.errors import CheckpointError, ConfigError
from genkit.models import FAMILIES

FAMILY = "test-ckpt-mlp"


class TinyMLP(nn.Module):
    """A small net with tied weights and a buffer, to exercise dedup and buffers."""

    def __init__(self, dim: int = 4, hidden: int = 8):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.inp = nn.Linear(dim, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.tied = nn.Linear(hidden, hidden)
        self.tied.weight = self.mid.weight
        self.out = nn.Linear(hidden, dim)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.tied(torch.tanh(self.mid(torch.tanh(self.inp(x))))))) * self.scale

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        loss = (self(batch) - batch).pow(2).mean()
        return loss, {}

    def config(self) -> dict:
        return {"family": FAMILY, "dim": self.dim, "hidden": self.hidden}

    @classmethod
    def from_config(cls, config: dict) -> TinyMLP:
        return cls(config["dim"], config["hidden"])


FAMILIES.register(FAMILY)(TinyMLP)


def make(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP()


def ema_of(model: nn.Module, shift: float) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() + shift if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def test_round_trip_raw_and_ema(tmp_path: Path) -> None:
    model = make()
    ema = ema_of(model, 0.25)
    checkpoint.save(tmp_path / "ck", model, ema=ema)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["config.json", "ema.safetensors", "model.safetensors"]
    raw = genkit.load(tmp_path / "ck", ema=False)
    assert isinstance(raw, TinyMLP) and not raw.training
    assert torch.equal(raw(X), model(X))
    assert raw.tied.weight is raw.mid.weight  # tying survives the round trip
    loaded = genkit.load(tmp_path / "ck")  # EMA by default
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ema[key].to(value.dtype)), key
    assert not torch.equal(loaded(X), model(X))


def test_without_ema_loads_raw(tmp_path: Path) -> None:
    model = make()
    checkpoint.save(tmp_path / "ck", model)
    assert torch.equal(genkit.load(tmp_path / "ck")(X), model(X))


def test_config_carries_versions(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ck", make())
    config = checkpoint.read_config(tmp_path / "ck")
    assert config["family"] == FAMILY and config["format"] == checkpoint.FORMAT_VERSION
    assert isinstance(config["genkit_version"], str) and config["torch_version"] == torch.__version__


def test_truncated_weights_name_the_file(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ck", make())
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|re-save)"):
        genkit.load(tmp_path / "ck")


def test_corrupt_header_without_size_record(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ck", make())
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    del config["genkit_files"]  # only safetensors' own parsing is left to notice
    config_path.write_text(json.dumps(config))
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        genkit.load(tmp_path / "ck", ema=False)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_family_errors(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ck", make())
    with pytest.raises(CheckpointError, match="'flow-matching' was expected"):
        genkit.load(tmp_path / "ck", expect_family="flow-matching")
    assert isinstance(genkit.load(tmp_path / "ck", expect_family=FAMILY), TinyMLP)
    _edit_config(tmp_path / "ck", family="no-such-family")
    with pytest.raises(CheckpointError, match=r"config\.json.*no-such-family") as info:
        genkit.load(tmp_path / "ck")
    assert isinstance(info.value.__cause__, ConfigError)


def test_newer_format_and_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        genkit.load(tmp_path / "nowhere")
    checkpoint.save(tmp_path / "ck", make())
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        genkit.load(tmp_path / "ck")
    _edit_config(tmp_path / "ck", format=checkpoint.FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="Upgrade genkit"):
        genkit.load(tmp_path / "ck")


def test_weights_that_do_not_fit_name_the_keys(tmp_path: Path) -> None:
    checkpoint.save(tmp_path / "ck", make())
    _edit_config(tmp_path / "ck", hidden=6)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*inp\.weight: saved \(8, 4\) vs model \(6, 4\)"):
        genkit.load(tmp_path / "ck")


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make(0)
    checkpoint.save(tmp_path / "ck", old, ema=ema_of(old, 0.5))
    real = checkpoint._write_tensors
    calls = []

    def crash_on_second(path, tensors, meta):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(path, tensors, meta)

    monkeypatch.setattr(checkpoint, "_write_tensors", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(tmp_path / "ck", make(1), ema=ema_of(old, 1.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left behind
    assert torch.equal(genkit.load(tmp_path / "ck", ema=False)(X), old(X))


def test_crash_between_renames_is_recovered(tmp_path: Path) -> None:
    old = make(0)
    checkpoint.save(tmp_path / "ck", old)
    os.rename(tmp_path / "ck", tmp_path / ".ck.old-123-deadbeef")  # the swap's only window
    assert torch.equal(genkit.load(tmp_path / "ck")(X), old(X))
    new = make(1)
    checkpoint.save(tmp_path / "ck", new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(genkit.load(tmp_path / "ck")(X), new(X))


def test_resume_state_round_trip_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pickle(*args, **kwargs):
        raise AssertionError("checkpoints must not pickle")

    monkeypatch.setattr(torch, "save", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    for _ in range(3):
        model.loss(X)[0].backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    state = {"step": 3, "window": {"loss": 0.5, "n": 1}, "betas": (0.8, 0.95)}
    checkpoint.save(tmp_path / "ck", model, ema=ema_of(model, 0.0), optimizer=opt, scheduler=sched,
                    trainer_state=state)
    assert checkpoint.has_resume_state(tmp_path / "ck")
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in (tmp_path / "ck").iterdir())
    model2 = make(5)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda k: 1.0 / (1 + k))
    loaded = checkpoint.load_training_state(tmp_path / "ck", model2, opt2, sched2)
    assert torch.equal(model2(X), model(X))
    assert {k: v for k, v in loaded.items() if k != "ema"} == state  # tuples stay tuples
    assert set(loaded["ema"]) == set(model.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for name, value in a["state"][idx].items():
            assert torch.equal(value, b["state"][idx][name]), (idx, name)


def test_resume_into_other_family_fails(tmp_path: Path) -> None:
    from dist_train_script import LinReg

    checkpoint.save(tmp_path / "ck", make(), trainer_state={"step": 1})
    with pytest.raises(CheckpointError, match="resume with the same model family"):
        checkpoint.load_training_state(tmp_path / "ck", LinReg())


def test_bad_state_and_config_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"trainer_state\.note has type object"):
        checkpoint.save(tmp_path / "ck", make(), trainer_state={"note": object()})
    with pytest.raises(CheckpointError, match="key 3 is not a string"):
        checkpoint.save(tmp_path / "ck", make(), trainer_state={3: "x"})
    assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == []

    class Reserved(TinyMLP):
        def config(self) -> dict:
            return {**super().config(), "format": "png"}

    with pytest.raises(ConfigError, match="reserved keys"):
        checkpoint.save(tmp_path / "ck", Reserved())


def test_save_refuses_to_delete_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    """Saving swaps a whole folder in: a run folder, a diffusers UNet folder (config.json of another format) or a
    file must be refused untouched; a missing or empty folder and an earlier checkpoint are written."""
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoint", make(0))
    (run / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"run: the folder holds other files \(checkpoint, metrics\.json\).*"
                                              r"new or empty folder"):
        checkpoint.save(run, make(1))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "metrics.json"]
    assert torch.equal(genkit.load(run / "checkpoint")(X), make(0)(X))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="other files"):
        checkpoint.save(unet, make(1))
    assert json.loads((unet / "config.json").read_text()) == {"_class_name": "UNet2DModel"}
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        checkpoint.save(tmp_path / "afile", make(1))
    assert (tmp_path / "afile").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    checkpoint.save(tmp_path / "empty", make(1))
    checkpoint.save(run / "checkpoint", make(1))  # re-saving a checkpoint (the trainer's every N steps) replaces it
    assert torch.equal(genkit.load(run / "checkpoint")(X), make(1)(X))
    assert torch.equal(genkit.load(tmp_path / "empty")(X), make(1)(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "run", "unet"]  # no temporary siblings


def test_load_takes_a_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = make(2)
    checkpoint.save(run / "checkpoint", model, trainer_state={"step": 7})
    (run / "metrics.json").write_text("{}")
    assert torch.equal(genkit.load(run)(X), model(X))
    assert checkpoint.read_config(run)["family"] == FAMILY
    assert checkpoint.has_resume_state(run) and checkpoint.read_trainer_state(run)["step"] == 7
    os.rename(run / "checkpoint", run / ".checkpoint.old-1-deadbeef")  # a crash inside the trainer's swap
    assert torch.equal(genkit.load(run)(X), model(X))


def test_load_of_a_diffusers_folder_points_to_from_diffusers(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(CheckpointError, match=r"diffusers pipeline folder.*genkit\.from_diffusers\("):
        genkit.load(pipe)
    (pipe / "model_index.json").unlink()  # a unet/ subfolder alone says the same
    with pytest.raises(CheckpointError, match=r"genkit\.from_diffusers\("):
        genkit.load(pipe)
    with pytest.raises(CheckpointError, match=r"diffusers UNet2DModel.*genkit\.from_diffusers\(.*scheduler"):
        genkit.load(pipe / "unet")


def _stepped(model: nn.Module, params, lr: float) -> tuple[torch.optim.Optimizer, object]:
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    for _ in range(2):
        model.loss(X)[0].backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt, sched


def test_several_named_optimizers_and_objective_state_round_trip(tmp_path: Path) -> None:
    model = make()
    body = [p for n, p in model.named_parameters() if not n.startswith("out.")]
    gen, gen_sched = _stepped(model, body, 1e-2)
    critic, critic_sched = _stepped(model, model.out.parameters(), 3e-2)
    own = {"log_z": torch.tensor(1.25), "critic.weight": torch.arange(6.0).reshape(2, 3)}
    checkpoint.save(tmp_path / "ck", model, optimizer={"gen": gen, "critic": critic},
                    scheduler={"gen": gen_sched, "critic": critic_sched}, trainer_state={"step": 2},
                    objective_state=own)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["config.json", "model.safetensors", "objective.safetensors", "optimizer.critic.json",
                     "optimizer.critic.safetensors", "optimizer.gen.json", "optimizer.gen.safetensors",
                     "scheduler.critic.json", "scheduler.gen.json", "trainer_state.json"]
    model2 = make(5)
    body2 = [p for n, p in model2.named_parameters() if not n.startswith("out.")]
    opts = {"gen": torch.optim.AdamW(body2, lr=1e-2), "critic": torch.optim.AdamW(model2.out.parameters(), lr=3e-2)}
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)) for k, o in opts.items()}
    loaded = checkpoint.load_training_state(tmp_path / "ck", model2, opts, scheds)
    assert torch.equal(model2(X), model(X)) and loaded["step"] == 2
    assert set(loaded["objective_state"]) == set(own)
    assert all(torch.equal(loaded["objective_state"][k], v) for k, v in own.items())
    for name, opt in (("gen", gen), ("critic", critic)):
        a, b = opt.state_dict(), opts[name].state_dict()
        assert a["param_groups"] == b["param_groups"], name
        assert all(torch.equal(v, b["state"][i][k]) for i in a["state"] for k, v in a["state"][i].items()), name
    assert scheds["critic"].state_dict() == critic_sched.state_dict()
    with pytest.raises(ConfigError, match=r"optimizer name 'a/b' is invalid"):
        checkpoint.save(tmp_path / "ck2", model, optimizer={"a/b": gen})
    with pytest.raises(ConfigError, match="trainer_state key 'objective_state' is reserved"):
        checkpoint.save(tmp_path / "ck2", model, trainer_state={"objective_state": 1})
    checkpoint.save(tmp_path / "plain", model, trainer_state={"step": 1})
    assert "objective_state" not in checkpoint.load_training_state(tmp_path / "plain", make())


def test_fingerprint_identifies_config_and_weights_and_load_tags_the_module(tmp_path: Path) -> None:
    from genkit import frozen

    model = make(0)
    ema = ema_of(model, 0.5)
    checkpoint.save(tmp_path / "a", model, ema=ema)
    checkpoint.save(tmp_path / "b", model, ema=ema)  # the same model in another folder
    fp = checkpoint.fingerprint(tmp_path / "a")
    assert fp == checkpoint.fingerprint(tmp_path / "b") and len(fp) == 64
    assert checkpoint.fingerprint(tmp_path / "a", ema=False) == frozen.fingerprint(model) != fp
    loaded = genkit.load(tmp_path / "a")
    assert frozen.fingerprint(loaded) == fp and frozen.source_of(loaded) == str((tmp_path / "a").resolve())
    loaded.double()  # a move changes no tag: the part is the folder's
    assert frozen.fingerprint(loaded) == fp
    nudged = {k: v.clone() for k, v in ema.items()}
    nudged["inp.bias"][0] += 1e-6
    checkpoint.save(tmp_path / "c", model, ema=nudged)
    assert checkpoint.fingerprint(tmp_path / "c") != fp  # one weight moved by 1e-6
    checkpoint.save(tmp_path / "d", model, ema=ema)
    _edit_config(tmp_path / "d", note="another run")  # equal weights, another config
    assert checkpoint.fingerprint(tmp_path / "d") != fp


def test_the_deprecated_checkpoint_load_warns_and_loads(tmp_path):
    """genkit.checkpoint.load, renamed genkit.load (genkit.loading.load), keeps working for one release with a
    DeprecationWarning naming the new home."""
    model = TinyMLP()
    checkpoint.save(tmp_path / "ck", model)
    with pytest.warns(DeprecationWarning, match="use genkit.load"):
        old = checkpoint.load(tmp_path / "ck")
    assert torch.equal(old(X), genkit.load(tmp_path / "ck")(X))
