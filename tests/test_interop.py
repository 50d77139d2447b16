"""diffusers interoperability: a diffusers UNet + scheduler folder as a genkit model, and diffusers
schedulers driving genkit fields."""

import pytest
import torch

import genkit
from genkit.analytic import Gaussian
from genkit.errors import ConfigError
from genkit.interop import DiffusersScheduler, from_diffusers
from genkit.paths import PATHS, get_path
from genkit.solvers import solve


def _tiny_pipeline(tmp_path, prediction_type="epsilon"):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    unet.save_pretrained(tmp_path / "unet")
    sched.save_pretrained(tmp_path / "scheduler")
    return unet, sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_genkit_solver_on_a_diffusers_folder_matches_diffusers(tmp_path, prediction_type):
    from diffusers import DPMSolverMultistepScheduler

    unet, sched = _tiny_pipeline(tmp_path, prediction_type)
    model = from_diffusers(tmp_path)
    assert model.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction_type]
    dpm = DPMSolverMultistepScheduler.from_config(sched.config, algorithm_type="dpmsolver++", solver_order=2)
    dpm.set_timesteps(8)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = x.clone()
    with torch.no_grad():
        for ts in dpm.timesteps:
            ref = dpm.step(unet(ref, ts).sample, ts, ref).prev_sample
        times = torch.cat([(dpm.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
        out = solve(model, x, "dpmpp_2m", None, times).samples
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # and it is a genkit model: default sampling, likelihood machinery, saving
    s = model.sample(2, solver="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 1, 8, 8) and torch.isfinite(s).all()
    genkit.save(tmp_path / "as_genkit", model)
    again = genkit.load(tmp_path / "as_genkit")
    xs = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(again(xs, 0.3), model(xs, 0.3))


def test_diffusers_ddim_scheduler_equals_genkit_ddim():
    from diffusers import DDIMScheduler

    path = get_path("ddpm")
    g = Gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[0.5, 0.1], [0.1, 0.3]]), path, "eps")
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True, clip_sample=False)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = solve(g, x, DiffusersScheduler(sched), 10)
    ours = solve(g, x, "ddim", None, out.times).samples
    assert out.nfe == 10
    # diffusers keeps alphas_cumprod in float32
    torch.testing.assert_close(out.samples, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "HeunDiscreteScheduler"])
def test_any_diffusers_scheduler_drives_a_flow_matching_field(name):
    """A velocity field on the linear path, sampled by a VP scheduler through the SNR-matching adapter."""
    import diffusers

    # the same DDPM betas for all (HeunDiscrete's defaults stop at sigma = 25, too early for this data)
    sched = getattr(diffusers, name)(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    g = Gaussian(torch.tensor([2.0, -1.0]), torch.tensor([[0.4, 0.1], [0.1, 0.2]]), get_path("linear"), "velocity")
    x1 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = solve(g, x1, DiffusersScheduler(sched), 25).samples
    # the distribution is right (the scheduler's own discretisation error aside)
    assert torch.allclose(out.mean(0), torch.tensor([2.0, -1.0], dtype=torch.float64), atol=0.1)
    assert torch.allclose(torch.cov(out.T), g.covariance(0.0), atol=0.08)


def test_bad_input(tmp_path):
    from diffusers import DDPMScheduler

    with pytest.raises(ConfigError, match="not a diffusers scheduler"):
        DiffusersScheduler(object())
    with pytest.raises(ConfigError, match="no diffusers folder"):
        from_diffusers(tmp_path / "missing")
    unet, _ = _tiny_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="beta_schedule"):
        from_diffusers(unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"))


# --- k-diffusion convention: sampler(model, x_ve, sigmas, extra_args=..., disable=...) with a denoiser model(x, sigma)
def _k_euler(model, x, sigmas, extra_args=None, disable=None):
    """Euler in the VE ODE dx/dsigma = (x - D(x, sigma)) / sigma, as k-diffusion's samplers are written."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def _k_heun(model, x, sigmas, extra_args=None, disable=None):
    """Heun in the same ODE, Euler on the last step to sigma = 0 (EDM's Algorithm 2 without churn)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * s_in)) / sigmas[i]
        h = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * h
        else:
            x_e = x + d * h
            d2 = (x_e - model(x_e, sigmas[i + 1] * s_in)) / sigmas[i + 1]
            x = x + (d + d2) / 2 * h
    return x


@pytest.mark.parametrize("name", PATHS.names())
def test_k_diffusion_convention_equals_genkit_twins(name):
    """Euler in the VE ODE is DDIM and EDM's Heun is EDMStochastic(churn=0), on any path and grid: the adapter's
    time/scale conversion is exact (to float64 round-off), NFE included."""
    from genkit.interop import KDiffusionSampler
    from genkit.solvers import EDMStochastic, Karras

    path = get_path(name)
    g = Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([[0.3, 0.1], [0.1, 0.2]],
                 dtype=torch.float64), path, "eps" if path.variance_preserving else "velocity")
    times = Karras(t_max=0.9, t_min=0.0).times(6, path)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sampler, twin in ((_k_euler, "ddim"), (_k_heun, EDMStochastic(churn=0.0))):
        ours, theirs = solve(g, x, twin, None, times), solve(g, x, KDiffusionSampler(sampler), None, times)
        assert theirs.nfe == ours.nfe
        torch.testing.assert_close(theirs.samples, ours.samples, rtol=1e-10, atol=1e-10)


def test_k_diffusion_sampler_library():
    """The real k-diffusion (in the test extra, so this runs in CI): its dpmpp_2m equals genkit's."""
    import k_diffusion.sampling as sampling

    from genkit.interop import KDiffusionSampler
    from genkit.solvers import Karras

    path = get_path("ddpm")
    g = Gaussian(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.2, path, "eps")
    times = Karras(sigma_max=150.0, t_min=0.0).times(8, path)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = solve(g, x, "dpmpp_2m", None, times)
    theirs = solve(g, x, KDiffusionSampler(sampling.sample_dpmpp_2m), None, times)
    torch.testing.assert_close(theirs.samples, ours.samples, rtol=1e-10, atol=1e-10)


def test_k_diffusion_bad_input():
    from genkit.interop import KDiffusionSampler

    with pytest.raises(ConfigError, match="sampler function"):
        KDiffusionSampler("sample_euler")
    g = Gaussian(torch.zeros(2), torch.eye(2), get_path("linear"))
    with pytest.raises(ConfigError, match="alpha = 0"):  # sigma_ve is infinite at t = 1 of a flow-matching path
        solve(g, torch.randn(4, 2), KDiffusionSampler(_k_euler), 4)
    with pytest.raises(ConfigError, match="endpoints only"):
        solve(g, torch.randn(4, 2), KDiffusionSampler(_k_euler), None, torch.tensor([0.9, 0.5, 0.0]),
              trajectory=True)


# --- export: genkit -> diffusers folder
def _ddpm_model(time_scale=1000.0, time_shift=-1.0, prediction="eps"):
    from genkit.models import Diffusion
    from genkit.nets import UNet

    torch.manual_seed(0)
    net = UNet(8, block_out_channels=(8, 16), norm_num_groups=8, time_scale=time_scale, time_shift=time_shift)
    return Diffusion(net, "ddpm", prediction, sample_shape=(1, 8, 8)).eval()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_to_diffusers_round_trips_exactly(tmp_path, prediction):
    """The exported folder loads in diffusers (DDPMPipeline) and back through from_diffusers; its UNet at integer step
    i is the genkit field at t = (i + 1) / N, and the re-imported model is the same field."""
    import diffusers

    from genkit.interop import PREDICTION_FROM_DIFFUSERS, to_diffusers

    model = _ddpm_model(prediction=prediction)
    folder = to_diffusers(model, tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    assert PREDICTION_FROM_DIFFUSERS[pipe.scheduler.config.prediction_type] == prediction
    x = torch.randn(3, 1, 8, 8)
    steps = torch.tensor([0, 499, 999])
    with torch.no_grad():
        theirs = pipe.unet(x, steps).sample
        ours = model(x, (steps + 1).double() / 1000)
        back = from_diffusers(folder)(x, (steps + 1).double() / 1000)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, ours, rtol=0, atol=0)
    # diffusers' own DDPM schedule is genkit's ddpm path
    t = (torch.arange(1000) + 1).double() / 1000
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), model.path.alpha(t) ** 2, rtol=1e-6, atol=1e-7)


def test_to_diffusers_refuses_what_would_not_match(tmp_path):
    import json

    from genkit.interop import to_diffusers
    from genkit.models import Diffusion, FlowMatching
    from genkit.nets import MLP

    default_time = _ddpm_model(time_scale=999.0, time_shift=0.0)  # genkit's default UNet time map
    with pytest.raises(ConfigError, match="time_scale=1000, time_shift=-1"):
        to_diffusers(default_time, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    folder = to_diffusers(default_time, tmp_path / "b", approximate_time=True)
    record = json.loads((folder / "genkit_export.json").read_text())
    assert not record["exact"] and 0 < record["time_offset_steps"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # written aside and moved: no temp folder left
    to_diffusers(_ddpm_model(), folder)  # exporting again replaces the folder
    assert json.loads((folder / "genkit_export.json").read_text())["exact"]
    with pytest.raises(ConfigError, match="'ddpm' path"):
        to_diffusers(Diffusion(_ddpm_model().net, "cosine", "v", sample_shape=(1, 8, 8)), tmp_path / "c")
    with pytest.raises(ConfigError, match="'ddpm' path"):
        to_diffusers(FlowMatching(MLP(2), sample_shape=(2,)), tmp_path / "d")
    with pytest.raises(ConfigError, match="UNet"):
        to_diffusers(Diffusion(MLP(2), "ddpm", "eps", sample_shape=(2,)), tmp_path / "e")


def test_to_diffusers_refuses_to_delete_a_folder_that_is_not_an_export(tmp_path):
    """Exporting into a training run folder used to replace it whole (checkpoint, metrics and all)."""
    from genkit.errors import CheckpointError
    from genkit.interop import to_diffusers

    model = _ddpm_model()
    run = tmp_path / "run"
    genkit.save(run / "checkpoint", model)
    (run / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"run: the folder holds other files \(checkpoint, metrics\.json\).*"
                                              r"new or empty folder"):
        to_diffusers(model, run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "metrics.json"]
    genkit.load(run / "checkpoint")
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(CheckpointError, match="afile: it is a file, not a folder"):
        to_diffusers(model, tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    folder = to_diffusers(model, tmp_path / "empty")
    (folder / "genkit_export.json").unlink()  # a plain diffusers pipeline folder (model_index.json) is replaced too
    to_diffusers(model, folder)
    assert (folder / "genkit_export.json").is_file() and (folder / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "run"]  # no temporary siblings


def test_from_diffusers_bad_folders_raise_genkit_errors(tmp_path):
    from genkit.errors import CheckpointError

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty holds no diffusers UNet.*the folder is empty"):
        from_diffusers(tmp_path / "empty")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile is a file, not a diffusers folder"):
        from_diffusers(tmp_path / "afile")
    genkit.save(tmp_path / "ck", _ddpm_model())
    with pytest.raises(CheckpointError, match=r"genkit checkpoint.*genkit\.load"):
        from_diffusers(tmp_path / "ck")
    _tiny_pipeline(tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot read the diffusers UNet"):
        from_diffusers(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match="no scheduler_config.json"):
        from_diffusers(tmp_path / "pipe" / "unet", tmp_path / "empty")


def test_genkit_diffusers_genkit_round_trip_keeps_the_time_map(tmp_path):
    """An approximate_time export (genkit's default UNet time map 999 t) comes back as the same genkit model: the
    export records the time map and from_diffusers restores it, with the Diffusion settings."""
    import json

    from genkit.interop import to_diffusers
    from genkit.models import Diffusion

    base = _ddpm_model(time_scale=999.0, time_shift=0.0, prediction="v")
    model = Diffusion(base.net, "ddpm", "v", "min_snr", sample_shape=(1, 8, 8), t_eps=0.01, t_max=0.9).eval()
    folder = to_diffusers(model, tmp_path / "pipe", approximate_time=True)
    back = from_diffusers(folder)
    assert back.config() == model.config()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t), model(x, t), rtol=0, atol=1e-6)
        # without the record it is diffusers' time map (step i = 1000 t - 1), up to one step off this network
        (folder / "genkit_export.json").rename(tmp_path / "record.json")
        plain = from_diffusers(folder)
        assert (plain.net.time_scale, plain.net.time_shift) == (1000.0, -1.0)
        assert not torch.allclose(plain(x, t), model(x, t), atol=1e-6)
    record = json.loads((tmp_path / "record.json").read_text())
    record["genkit_config"]["prediction"] = "eps"  # a record that no longer fits the folder's scheduler
    (folder / "genkit_export.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="changed after the export.*Delete genkit_export.json"):
        from_diffusers(folder)


def test_dpm_solver_sde_scheduler_is_seeded_by_the_generator():
    """DPMSolverSDEScheduler's step takes no generator (Brownian-tree noise seeded by noise_sampler_seed): the seed
    is drawn from the generator, so equal generators give equal samples whatever the global RNG."""
    from diffusers import DPMSolverSDEScheduler

    g = Gaussian(torch.tensor([2.0, -1.0]), torch.tensor([[0.4, 0.1], [0.1, 0.2]]), get_path("ddpm"), "eps")
    sched = DPMSolverSDEScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x1 = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return solve(g, x1, DiffusersScheduler(sched), 6, generator=torch.Generator().manual_seed(seed)).samples

    first = run(0, global_seed=1)
    assert torch.equal(run(0, global_seed=2), first)
    assert (run(1, global_seed=1) - first).abs().max() > 0.01
    assert sched.noise_sampler_seed is None  # the scheduler given is not mutated
    assert DiffusersScheduler(sched).stochastic


def test_a_scheduler_drawing_its_own_noise_refuses_a_generator():
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    class OwnNoise(EulerDiscreteScheduler):
        def step(self, model_output, timestep, sample, return_dict=True):
            out = super().step(model_output, timestep, sample, return_dict=True)
            out.prev_sample = out.prev_sample + 1e-3 * torch.randn_like(sample)
            return out

    g = Gaussian(torch.tensor([2.0, -1.0]), torch.tensor([[0.4, 0.1], [0.1, 0.2]]), get_path("ddpm"), "eps")
    x1 = torch.randn(8, 2, dtype=torch.float64)
    solver = DiffusersScheduler(OwnNoise(num_train_timesteps=1000, beta_schedule="linear"))
    assert solver.stochastic
    with pytest.raises(ConfigError, match=r"OwnNoise draws its own noise.*torch\.manual_seed"):
        solve(g, x1, solver, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(solve(g, x1, solver, 4).samples).all()  # without a generator it runs on the global RNG
    heun = DiffusersScheduler(HeunDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear"))
    assert not heun.stochastic  # deterministic: a generator (used for the prior draw by model.sample) is fine
    solve(g, x1, heun, 4, generator=torch.Generator().manual_seed(0))


def test_a_class_conditional_diffusers_unet_loads_as_a_conditional_model(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=4)
    with torch.no_grad():  # diffusers initialises the embedding randomly already; make the classes far apart
        unet.class_embedding.weight.mul_(10.0)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(tmp_path / "scheduler")
    unet.save_pretrained(tmp_path / "unet")

    model = from_diffusers(tmp_path)  # all four embeddings are classes
    assert (model.num_classes, model.null_label, model.net.config()["num_classes"]) == (4, None, 4)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.2, 0.5, 0.9])
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        ref = unet(x, t * 1000 - 1, class_labels=labels).sample  # diffusers' step i = N t - 1
        torch.testing.assert_close(model(x, t, labels=labels), ref, rtol=0, atol=0)
        assert not torch.allclose(model(x, t, labels=labels), model(x, t, labels=labels.flip(0)))
    with pytest.raises(ConfigError, match="needs labels"):
        model(x, t)
    with pytest.raises(ConfigError, match="no null label"):
        model.sample(2, labels=1, guidance=2.0, steps=2)

    guided = from_diffusers(tmp_path, null_label=3, class_names=["a", "b", "c"])  # the last embedding is "no class"
    assert (guided.num_classes, guided.null_label, guided.class_names) == (3, 3, ["a", "b", "c"])
    s = guided.sample(2, labels=1, guidance=2.0, solver="ddim", steps=3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, 1, 8, 8) and torch.isfinite(s).all()
    genkit.save(tmp_path / "as_genkit", guided)
    again = genkit.load(tmp_path / "as_genkit")
    assert (again.num_classes, again.null_label, again.class_names) == (3, 3, ["a", "b", "c"])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, labels=labels), guided(x, t, labels=labels))
    with pytest.raises(ConfigError, match="last class embedding, 3"):
        from_diffusers(tmp_path, null_label=0)
    with pytest.raises(ConfigError, match="unconditional"):
        from_diffusers(_tiny_pipeline(tmp_path / "plain")[0], _tiny_pipeline(tmp_path / "plain")[1], null_label=3)
