"""Masked (absorbing-state) discrete diffusion, MDLM (Sahoo et al. 2024, arXiv 2406.07524; METHODS.md section 3),
registered in :data:`genkit.models.FAMILIES` as ``mdlm``.

Sequences are long tensors ``x [B, L]`` of tokens in ``0..V-1``; the MASK token is ``V``. The forward process
masks each position independently with probability ``1 - alpha(t)`` (a :mod:`genkit.models.masking` schedule;
``t = 0`` data, ``t = 1`` all MASK). A denoiser ``net(x_t, t) -> logits [B, L, V]`` takes token ids ``[B, L]``
in ``0..V`` or a float soft one-hot ``[B, L, V + 1]`` (e.g. :class:`genkit.nets.tokens.TokenMLP`).

- :meth:`MaskedDiffusion.logits` is the SUBS parameterisation, ``log p(x_0 | x_t) [B, L, V + 1]``: the MASK
  column is ``-inf`` (never predict MASK) and an unmasked position is the one-hot of its own token
  (carry-over; for a soft one-hot, the positions whose argmax is not MASK).
- :meth:`MaskedDiffusion.loss` is the continuous-time negative ELBO per token, :meth:`nll_bound` the negative
  ELBO per sequence in nats, an upper bound on ``-log p(x)``.
- :meth:`MaskedDiffusion.concrete_score` is the ratio view of the same denoiser (SEDD / SEPO style).
- It samples with :class:`genkit.sampling.MaskedAncestralSampler` (``masked_ancestral``).

>>> import torch
>>> model, batch = MaskedDiffusion.example()
>>> model.sample(2, steps=4, generator=torch.Generator().manual_seed(0)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_device, check_generator
from ..errors import ConfigError, DataError, ShapeError
from ..nets import build as build_net
from ..nets.tokens import TokenMLP, token_one_hot
from ..sampling import SAMPLERS, MaskedAncestralSampler, Sampler
from ..solvers import Solution
from .masking import MaskSchedule, get_schedule
from .registry import FAMILIES

__all__ = ["MaskedDiffusion"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


@FAMILIES.register("mdlm")
class MaskedDiffusion(nn.Module):
    """MDLM: ``MaskedDiffusion(net, *, vocab_size, length, schedule="log_linear", t_min=1e-3)``.

    ``net(x_t, t) -> logits [B, L, vocab_size]`` is the denoiser; ``schedule`` a
    :data:`~genkit.models.masking.MASK_SCHEDULES` name or a MaskSchedule; ``t_min`` the lowest training time
    (the loss draws ``t`` in ``[t_min, 1]``, where the weight ``1 / t`` of the log-linear schedule is at most
    ``1 / t_min``). Samples are ``[n, length]`` long tokens (``sample_shape = (length,)``).
    """

    family = "mdlm"
    #: samples are tokens: no pathwise derivative (``rsample`` refuses), and two seeds may agree at a position.
    discrete: ClassVar[bool] = True
    data_free: ClassVar[bool] = False

    def __init__(self, net: nn.Module, *, vocab_size: int, length: int, schedule: str | MaskSchedule = "log_linear",
                 t_min: float = 1e-3):
        super().__init__()
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.length = _positive_int("length", length)
        if isinstance(t_min, bool) or not isinstance(t_min, numbers.Real) or not 0 < t_min < 1:
            raise ConfigError(f"t_min must be a number in (0, 1) (the lowest training time; MDLM uses 1e-3); got "
                              f"{t_min!r}")
        self.t_min = float(t_min)
        self.schedule = get_schedule(schedule)
        self.net = net
        self.sample_shape = (self.length,)

    @property
    def mask_id(self) -> int:
        """The MASK token, ``vocab_size``."""
        return self.vocab_size

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    # --- the forward process and the denoiser ----------------------------------------------------------------
    def check_tokens(self, x: Any, where: str, name: str = "x") -> Tensor:
        """``x`` when it is a long tensor ``[B, length]`` of data tokens ``0..V-1``; a ShapeError naming the fix."""
        if not torch.is_tensor(x) or x.is_floating_point() or x.dtype == torch.bool or x.ndim != 2 \
                or x.shape[1] != self.length:
            what = f"{x.dtype} of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
            raise ShapeError(f"{where}: {name} must be a long tensor of token ids [B, {self.length}] in "
                             f"0..{self.vocab_size - 1}; got {what}. Convert with {name}.long(), or build the model "
                             f"with length={x.shape[-1] if torch.is_tensor(x) and x.ndim else '...'}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
            raise ShapeError(f"{where}: {name} holds token ids in {int(x.min())}..{int(x.max())} but data tokens lie "
                             f"in 0..{self.vocab_size - 1} ({self.vocab_size} is MASK); remap the data or build the "
                             f"model with vocab_size={int(x.max()) + 1}")
        return x.long()

    def _time(self, t: Tensor | float, batch: int, device: torch.device) -> Tensor:
        if not torch.is_tensor(t):
            return torch.full((batch,), float(t), device=device)
        if not t.is_floating_point() or t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
            raise ShapeError(f"t must be a float or a float tensor [{batch}]; got {t.dtype} of shape {tuple(t.shape)}")
        return t.expand(batch) if t.ndim == 0 else t

    def mask(self, x0: Tensor, t: Tensor | float, generator: torch.Generator | None = None) -> Tensor:
        """The forward process: ``x_t [B, L]``, each position of ``x0`` MASK with probability ``1 - alpha(t)``
        (``t [B]`` or a float), independently, drawn from ``generator``."""
        x0 = self.check_tokens(x0, f"{self.family}.mask", "x0")
        t = self._time(t, x0.shape[0], x0.device)
        on = generator.device if generator is not None else x0.device
        u = torch.rand(x0.shape, generator=generator, device=on).to(x0.device)
        return torch.where(u < self.schedule.mask_prob(t)[:, None].to(u.dtype), self.mask_id, x0)

    def logits(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """SUBS log-probabilities ``log p(x_0 | x_t) [B, L, V + 1]`` for tokens ``x_t [B, L]`` in ``0..V`` or a
        soft one-hot ``[B, L, V + 1]``: the network's log-softmax at masked positions, ``-inf`` in the MASK
        column, the exact one-hot (``0`` at the token, ``-inf`` elsewhere) at unmasked positions."""
        where = f"{self.family}.logits"
        onehot = token_one_hot(x_t, self.vocab_size, self.length, where)
        t = self._time(t, x_t.shape[0], x_t.device)
        out = self.net(x_t, t)
        if not torch.is_tensor(out) or tuple(out.shape) != (x_t.shape[0], self.length, self.vocab_size):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ShapeError(f"{where}: the denoiser must return logits [B, L, V] = [{x_t.shape[0]}, {self.length}, "
                             f"{self.vocab_size}] (no MASK column); {type(self.net).__name__} returned {got}")
        logp = torch.cat([out.log_softmax(-1), torch.full_like(out[..., :1], -torch.inf)], -1)
        token = onehot.argmax(-1)
        carry = torch.zeros_like(logp).masked_fill(F.one_hot(token, self.vocab_size + 1) == 0, -torch.inf)
        return torch.where((token != self.mask_id)[..., None], carry, logp)

    def concrete_score(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """The concrete score ``[B, L, V]`` of the noisy marginal: at a masked position ``l`` of ``x_t``,
        ``p_t(x_t with l := y) / p_t(x_t) = alpha_t / (1 - alpha_t) * p(x_0^l = y | x_t)``.

        Derivation: ``p_t(x) = sum_{x_0} p(x_0) prod_j [1(x^j = MASK)(1 - alpha_t) + 1(x^j = x_0^j) alpha_t]``;
        unmasking position ``l`` to ``y`` swaps its factor ``1 - alpha_t`` for ``alpha_t 1(x_0^l = y)``, so the
        ratio is ``alpha_t / (1 - alpha_t) * P(x_0^l = y | x_t)``. Unmasked positions hold 0: the absorbing
        reverse process never moves a token that is already unmasked."""
        logp = self.logits(x_t, t)[..., :self.vocab_size]
        t = self._time(t, x_t.shape[0], x_t.device)
        a = self.schedule.alpha(t).to(logp.dtype)[:, None, None]
        masked = (token_one_hot(x_t, self.vocab_size, self.length, "concrete_score").argmax(-1) == self.mask_id)
        return torch.where(masked[..., None], a / (1 - a) * logp.exp(), torch.zeros_like(logp))

    # --- training and the likelihood bound -------------------------------------------------------------------
    def _token_nll(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """``-weight(t) * 1(masked) * -log p(x_0^l | x_t)`` per token, ``[B, L]``."""
        x_t = self.mask(x0, t, generator)
        logp = self.logits(x_t, t)
        nll = -logp.gather(-1, x0[..., None])[..., 0]
        w = -self.schedule.weight(t).to(nll.dtype)[:, None]
        return torch.where(x_t == self.mask_id, w * nll, torch.zeros_like(nll))

    def loss(self, batch: Any, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        """The MDLM negative ELBO per token: ``mean over the batch and the L positions of -alpha'(t) / (1 -
        alpha(t)) * 1(x_t^l = MASK) * -log p(x_0^l | x_t)`` (``1 / t`` for the log-linear schedule; MDLM's
        per-token report). ``t`` is low-discrepancy in ``[t_min, 1]``: ``t_i = t_min + (1 - t_min) ((u + i / B)
        mod 1)`` with one uniform ``u``; ``u`` and the masks are drawn from ``generator``."""
        check_generator(generator, f"{self.family}.loss")
        if batch is None:
            raise DataError(f"{self.family}.loss trains on data and got none (batch=None); pass a tensor of token "
                            "sequences [n, length] (Trainer.fit(data)); only data-free objectives train without it")
        x0 = self.check_tokens(batch, f"{self.family}.loss", "batch")
        b = x0.shape[0]
        on = generator.device if generator is not None else x0.device
        u = torch.rand((), generator=generator, device=on).to(x0.device)
        t = self.t_min + (1 - self.t_min) * ((u + torch.arange(b, device=x0.device) / b) % 1)
        per_token = self._token_nll(x0, t, generator)
        loss = per_token.mean()
        return loss, {"nelbo_per_token": float(loss.detach())}

    def nll_bound(self, x: Tensor, *, n_mc: int = 64, generator: torch.Generator | None = None) -> Tensor:
        """The negative ELBO per sequence in nats, ``[B]``: ``int_0^1 -alpha'(t) / (1 - alpha(t)) E[sum over
        masked positions of -log p(x_0^l | x_t)] dt``, estimated with ``n_mc`` stratified times ``t_k = (k +
        u) / n_mc`` in ``(0, 1)`` (not truncated at ``t_min``) and one mask draw each, from ``generator``. Its
        expectation is an upper bound on ``-log p(x)`` of the model's continuous-time process (equal to it
        for the exact denoiser of a distribution); per token, divide by ``length``."""
        n_mc = _positive_int("n_mc", n_mc)
        check_generator(generator, f"{self.family}.nll_bound")
        x = self.check_tokens(x, f"{self.family}.nll_bound")
        on = generator.device if generator is not None else x.device
        u = torch.rand((), generator=generator, device=on).to(x.device)
        total = torch.zeros(x.shape[0], device=x.device)
        for k in range(n_mc):
            t = ((k + u) / n_mc).clamp(min=1e-6).expand(x.shape[0])
            total = total + self._token_nll(x, t, generator).sum(-1)
        return total / n_mc

    # --- sampling --------------------------------------------------------------------------------------------
    def samplers(self) -> tuple[str, ...]:
        return ("masked_ancestral",)

    def default_sampler(self) -> Sampler:
        return MaskedAncestralSampler()

    def get_sampler(self, sampler: str | Sampler | None = None, steps: int | None = None) -> Sampler:
        sampler = self.default_sampler() if sampler is None else sampler
        if isinstance(sampler, str):
            sampler = SAMPLERS.get(sampler)(steps=steps) if sampler in self.samplers() else sampler
        elif steps is not None and isinstance(sampler, Sampler):
            sampler = sampler.with_steps(steps)
        # a guided sampler (genkit.finetune.svdd) is passed as an object, built with its reward; it declares the
        # sampler whose reverse step it reweights (``guides``), so it runs wherever that one does
        supported = isinstance(sampler, Sampler) and (sampler.name in self.samplers()
                                                       or getattr(sampler, "guides", None) in self.samplers())
        if not supported:
            raise ConfigError(f"{self.family} samples with {self.samplers()}; got sampler {sampler!r}")
        return sampler

    @torch.no_grad()
    def sample(self, n: int, *, sampler: str | Sampler | None = None, steps: int | None = None,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               return_solution: bool = False, labels: None = None) -> Tensor | Solution:
        """``n`` token sequences ``[n, length]`` (long) from the all-MASK prior through ``sampler`` (default
        :class:`~genkit.sampling.MaskedAncestralSampler`, 64 steps; ``steps`` sets its count).
        ``return_solution=True`` returns the :class:`~genkit.solvers.Solution` (its NFE counts network calls).
        ``labels`` must be None (the scripts pass it to every family): this model is unconditional."""
        if labels is not None:
            raise ConfigError(f"{self.family} models are unconditional; got labels={labels!r} (drop --class)")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"n must be a positive integer; got {n!r}")
        sampler = self.get_sampler(sampler, steps)
        check_generator(generator, f"{self.family}.sample")
        device = check_device(device, f"{self.family}.sample") if device is not None else self._device()
        x = torch.full((int(n), self.length), self.mask_id, dtype=torch.long, device=device)
        sol = sampler.sample(self, x, generator=generator)
        return sol if return_solution else sol.samples

    def rsample(self, n: int, **options: Any) -> Tensor:
        """Not available: token samples are discrete, so they have no pathwise derivative."""
        raise ConfigError(f"{self.family} samples discrete tokens, which have no pathwise derivative (rsample); use "
                          "sample(n) without gradients, or a relaxed (Gumbel-softmax) trajectory through soft one-hot "
                          "states as DRAKES does")

    # --- config and the family registry's hooks --------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        net = self.net.config() if callable(getattr(self.net, "config", None)) else None
        if not isinstance(net, dict):
            raise ConfigError(f"{self.family}.config(): the denoiser {type(self.net).__name__} has no config(); use "
                              "a genkit network (TokenMLP, or one in genkit.nets.NETS)")
        return {"family": self.family, "vocab_size": self.vocab_size, "length": self.length,
                "schedule": self.schedule.name, "t_min": self.t_min, "net": net}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskedDiffusion:
        config = dict(config)
        if config.pop("family", cls.family) != cls.family:
            raise ConfigError(f"not an {cls.family} config: {config!r}")
        return cls(build_net(config.pop("net")), **config)

    # --- train/train.py and eval/evaluate.py hooks ----------------------------------------------------------
    #: train.py fills these where the flag is not given (the flags' argparse defaults are None)
    cli_defaults: ClassVar[dict[str, Any]] = {"schedule": "log_linear", "net": "token_mlp", "t_min": 1e-3,
                                              "heads": 4}
    #: the family builds its denoiser from --net / --hidden / --depth (train.py's MLP and UNet are for floats)
    needs_net: ClassVar[bool] = False
    #: --net names and the keyword each of train.py's --hidden / --depth sets in them (with their defaults)
    NETS: ClassVar[dict[str, tuple[str, int, str, int]]] = {
        "token_mlp": ("hidden", 128, "depth", 2),
        "sequence_transformer": ("dim", 128, "depth", 4),
        "conv_dna": ("channels", 128, "depth", 20),
    }

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        from .masking import MASK_SCHEDULES

        group.add_argument("--schedule", help=f"masking schedule, one of {', '.join(MASK_SCHEDULES.names())} "
                                              f"(default: {cls.cli_defaults['schedule']})")
        group.add_argument("--net", help=f"denoiser, one of {', '.join(cls.NETS)} (default: token_mlp); --hidden sets "
                                         "its width (hidden / dim / channels: 128), --depth its blocks (2 / 4 / 20)")
        group.add_argument("--heads", type=int, help="--net sequence_transformer: attention heads (default: 4)")
        group.add_argument("--t-min", type=float, help="lowest training time (default: 1e-3)")

    @classmethod
    def prepare_data(cls, args: argparse.Namespace, data: Any) -> None:
        """train.py's check of the training data before the model is built: token ids (a long tensor [N, L]),
        else a ConfigError naming the token data sets; sets ``args.vocab_size`` (a named set's vocabulary, else
        the largest id + 1)."""
        from ..data import TOKEN_SETS

        x = getattr(data, "data", data)
        if not torch.is_tensor(x) or x.is_floating_point() or x.dtype == torch.bool or x.ndim != 2:
            what = (f"{x.dtype} of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__)
            raise ConfigError(f"--family {cls.family} trains on token sequences (a long tensor [N, L]); "
                              f"{getattr(args, 'data', None) or 'this data'} is {what}. Use a token data set: "
                              f"--data {' or '.join(TOKEN_SETS)}")
        named = TOKEN_SETS.get(getattr(args, "data", None))
        args.vocab_size = named if named is not None else int(x.max()) + 1

    @classmethod
    def from_args(cls, args: argparse.Namespace, net: Any, sample_shape: Sequence[int]) -> MaskedDiffusion:
        if len(sample_shape) != 1:
            raise ConfigError(f"--family {cls.family} needs token sequences [N, L]; got samples of shape "
                              f"{tuple(sample_shape)}")
        vocab = getattr(args, "vocab_size", None)
        if vocab is None:
            raise ConfigError(f"--family {cls.family}: the vocabulary is read from the data (prepare_data) first")
        if args.net not in cls.NETS:
            raise ConfigError(f"unknown --net {args.net!r}; choose one of {', '.join(cls.NETS)}")
        width, width_default, blocks, blocks_default = cls.NETS[args.net]
        options: dict[str, Any] = {width: width_default if args.hidden is None else args.hidden,
                                   blocks: blocks_default if args.depth is None else args.depth}
        if args.net == "sequence_transformer":
            options["heads"] = args.heads
        elif args.heads != cls.cli_defaults["heads"]:
            raise ConfigError(f"--heads applies to --net sequence_transformer only; drop it (--net {args.net})")
        length = int(sample_shape[0])
        net = build_net({"name": args.net, "vocab_size": vocab, "length": length, **options})
        return cls(net, vocab_size=vocab, length=length, schedule=args.schedule, t_min=args.t_min)

    @classmethod
    def net_options(cls, args: argparse.Namespace, kind: str) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def sample_report(self, samples: Tensor, reference: Tensor, floor: Tensor, *, data: str | None = None,
                      nll_n: int = 1000, n_mc: int = 16, generator: torch.Generator | None = None
                      ) -> dict[str, Any]:
        """What train.py and evaluate.py report for token samples ``[n, L]`` against held-out ``reference``,
        with ``floor`` (a second held-out draw) as the noise floor:

        - ``token_tv``: the per-position total variation ``mean_l 1/2 sum_v |p_samples(l, v) - p_ref(l, v)|``
          between the token frequencies (0 for equal marginals; a statistic of the marginals only);
        - the data set's own statistics (:func:`genkit.data.sequence_statistics`: ``motif_rate`` for motifs),
          for the samples, and for the reference in ``reference_statistics``;
        - ``noise_floor``: the same numbers for ``floor`` against ``reference``;
        - ``nll``: the negative ELBO of the first ``nll_n`` reference sequences (:meth:`nll_bound`, ``n_mc``
          times each) in nats per sequence, an upper bound on their NLL in expectation, with its standard error
          and ``bits_per_dim`` (bits per token); ``data_entropy_nats`` holds the data's known entropy bounds
          where they are known (motifs), which the true NLL is at least."""
        from ..data.sequences import motifs_entropy_bounds, sequence_statistics, token_frequencies

        def tv(x: Tensor) -> float:
            p, q = token_frequencies(x, self.vocab_size), token_frequencies(reference, self.vocab_size)
            return float(0.5 * (p - q).abs().sum(-1).mean())

        samples, reference, floor = (self.check_tokens(x.cpu(), f"{self.family}.sample_report", name)
                                     for x, name in ((samples, "samples"), (reference, "reference"),
                                                     (floor, "floor")))
        report: dict[str, Any] = {"token_tv": tv(samples), **sequence_statistics(data, samples)}
        report["noise_floor"] = {"token_tv": tv(floor), **sequence_statistics(data, floor)}
        report["reference_statistics"] = sequence_statistics(data, reference)
        device = self._device()
        held = reference[:nll_n].to(device)
        values = torch.cat([self.nll_bound(batch, n_mc=n_mc, generator=generator).double().cpu()
                            for batch in held.split(500)])
        nats = float(values.mean())
        report["nll"] = {"nats": nats, "bits_per_dim": nats / (self.length * math.log(2)),
                         "stderr_nats": float(values.std() / math.sqrt(len(values))) if len(values) > 1 else None,
                         "n": len(values), "n_mc": n_mc, "method": "ELBO (upper bound)",
                         "note": "negative ELBO per sequence (nll_bound), bits_per_dim is bits per token"}
        if data == "motifs":
            low, high = motifs_entropy_bounds(self.length)
            report["data_entropy_nats"] = {"lower": low, "upper": high}
        return report

    @classmethod
    def example(cls) -> tuple[MaskedDiffusion, Tensor]:
        """A tiny seeded model (V = 4 tokens, L = 3, a TokenMLP) and 16 token sequences it trains on."""
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's global RNG untouched
            torch.manual_seed(0)
            model = cls(TokenMLP(vocab_size=4, length=3, hidden=16, depth=1, embed_dim=4, time_dim=8),
                        vocab_size=4, length=3)
        batch = torch.randint(0, 4, (16, 3), generator=torch.Generator().manual_seed(0))
        return model, batch
