"""Forward-mode derivatives of networks with the PyTorch pitfalls handled (MeanFlow, Modular MeanFlow and other
losses built on a Jacobian-vector product ``d/de f(x + e v)``).

:func:`jvp` is :func:`torch.func.jvp` run

- in full precision: autocast is disabled on the inputs' device type and half / bfloat16 inputs and tangents are
  cast to float32 (a JVP under bf16 autocast loses most of the tangent's digits; py-meanflow turns autocast off
  around its JVP too). Float64 stays float64;
- with scaled-dot-product attention on the math kernel (``SDPBackend.MATH``): the fused kernels (flash,
  memory-efficient, cuDNN) have no forward-mode derivative;
- with or without a graph: ``create_graph=False`` runs it under ``no_grad`` (the target of a stop-gradient loss:
  no memory kept), ``True`` keeps the graph, so both outputs are differentiable with respect to the parameters
  the function closes over (double-backward through the JVP).

:func:`seeded_rng` makes two passes of a network draw the same random numbers (the same dropout mask in the JVP
pass and in the primal pass): each pass runs inside it with the same seed, and the global RNG is left as it was.

``torch.func.jvp`` does not accept a ``DistributedDataParallel`` wrapper: call it on the module itself
(``ddp.module``). genkit's trainer runs the whole loss inside the wrapped forward, so a family's ``self.net``
there already is the plain module and DDP still synchronises the gradients of the loss.

>>> import torch
>>> f = lambda x, a: a * x.pow(2)
>>> out, tangent = jvp(f, (torch.tensor([3.0]), torch.tensor([2.0])), (torch.tensor([1.0]), torch.tensor([0.0])))
>>> out.item(), tangent.item()   # d/de 2 (3 + e)^2 = 12
(18.0, 12.0)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError

__all__ = ["jvp", "network_jvp", "has_own_jvp", "seeded_rng"]

_LOW = (torch.float16, torch.bfloat16)


def _full(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _LOW else x


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], *,
        create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), d/de fn(*(p + e t)))`` at ``e = 0`` by forward-mode AD, in full precision with the math
    attention kernel (see the module docstring). Tangents must have the shapes of their primals."""
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ShapeError(f"jvp needs one tangent per primal; got {len(primals)} primals and {len(tangents)} tangents")
    for k, (p, t) in enumerate(zip(primals, tangents)):
        if p.shape != t.shape:
            raise ShapeError(f"tangent {k} has shape {tuple(t.shape)} but its primal {tuple(p.shape)}; give each "
                             "argument a tangent of its own shape (zeros for an argument held fixed)")
    primals = tuple(_full(p) for p in primals)
    tangents = tuple(_full(t).to(p.dtype) for p, t in zip(primals, tangents))
    device_type = primals[0].device.type if primals else "cpu"
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type, enabled=False))
        if device_type != "cpu":  # ops on CPU tensors inside the function are not autocast either
            stack.enter_context(torch.autocast("cpu", enabled=False))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.enable_grad() if create_graph else torch.no_grad())
        out, tangent = torch.func.jvp(fn, primals, tangents)
    return out, tangent


def has_own_jvp(net: object, x: Tensor) -> bool:
    """Whether :func:`network_jvp` runs ``net``'s own JVP rules on input ``x``: ``net`` has a ``forward_jvp``
    method (genkit's :class:`~genkit.nets.TwoTimeMLP`), ``x`` is float32 or float64 and no autocast is active
    on its device. Under autocast or in half precision the JVP must run in float32 while the loss's primal keeps
    the caller's precision, so they stay two passes (:func:`jvp` and an ordinary forward)."""
    return (callable(getattr(net, "forward_jvp", None)) and x.dtype not in _LOW
            and not torch.is_autocast_enabled(x.device.type))


def network_jvp(net: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], *,
                create_graph: bool = False, mode: str = "auto", **cond: object) -> tuple[Tensor, Tensor, bool]:
    """``(net(*primals, **cond), its JVP along tangents, is_forward)``.

    With ``mode="auto"`` and :func:`has_own_jvp`, one pass of ``net.forward_jvp``: the output is the ordinary
    forward's, with its graph whenever grad mode is on (``is_forward`` True: a loss can use it as its
    prediction), the tangent with a graph only for ``create_graph``. Otherwise (``mode="torch"``, or a net
    without JVP rules) :func:`torch.func.jvp` through :func:`jvp`: its output has a graph only with
    ``create_graph`` and may differ from the forward's in the last bits (``is_forward`` False: a caller that
    needs the prediction runs an ordinary forward).
    Both give the same derivative (to rounding); the first costs about two forwards on any device, the second
    pays PyTorch's forward-mode overhead per operation (about 3x a forward and backward on a small CPU MLP)."""
    if mode not in ("auto", "torch"):
        raise ConfigError(f"jvp mode must be 'auto' (a network's own JVP rules where it has them) or 'torch' "
                          f"(torch.func.jvp always); got {mode!r}")
    primals, tangents = tuple(primals), tuple(tangents)
    if mode == "auto" and primals and has_own_jvp(net, primals[0]):
        out, tangent = net.forward_jvp(primals, tangents, tangent_graph=create_graph, **cond)
        return out, tangent, True
    out, tangent = jvp(lambda *args: net(*args, **cond), primals, tangents, create_graph=create_graph)
    return out, tangent, False


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str) -> Iterator[None]:
    """Run the block with the global RNG of the CPU and of ``device`` seeded with ``seed``, then restore both:
    two blocks with the same seed draw the same numbers (dropout masks), and the caller's RNG stream is
    untouched."""
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        with module.device(index):
            module.manual_seed(seed)
        yield
