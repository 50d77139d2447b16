"""Classifier-free guidance on conditional digits: class accuracy and Frechet distance against the guidance scale.

A class-conditional flow-matching model (linear path, residual MLP on the flattened 8x8 digits, 10% class dropout
to the null label) is trained with genkit's Trainer, then sampled with classifier-free guidance
(``model.sample(n, labels=..., guidance=s)``, heun) at scales 0 (unconditional: the null label) to 6, the same
noise at every scale. For each scale:

- **class accuracy**: the fraction of samples that the digits classifier (``genkit.metrics.train_digits_classifier``
  on the train split) reads as the asked class; its accuracy on the real test digits is the ceiling;
- **Frechet distance** in that classifier's features (``genkit.metrics.fid``) to the held-out test digits, with the
  noise floor of a train subset of the same size (``genkit.data.held_out("digits")``; the median over
  ``--floor-draws`` train subsets, whose spread is reported, as one subset's distance is itself noisy). The
  estimate's bias grows as the sample count shrinks, so it is computed on as many samples as the floor has (the
  first ``len(floor)``, labels still balanced); the accuracy uses all ``n``.

Labels are balanced (``i mod 10``); the test set's classes are nearly so. Repeats draw other noise (seeds); the
table shows medians over them. Writes ``eval/results/bench_guidance.{json,md,png}``.

    python eval/bench_guidance.py                 # ~3 min on 2 CPU cores
    python eval/bench_guidance.py --steps 500 --repeats 1 --n 400   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, markdown_table, median, write_results  # noqa: E402

import genkit  # noqa: E402
from genkit import metrics  # noqa: E402
from genkit.data import LabelledData, digits, digits_labels, held_out, load_dataset, load_labelled  # noqa: E402
from genkit.models import FlowMatching  # noqa: E402
from genkit.nets import MLP  # noqa: E402
from genkit.train import TrainConfig, Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--scales", default="0,0.5,1,1.5,2,3,4,5,6", help="guidance scales, comma separated")
    p.add_argument("--n", type=int, default=1000, help="samples per scale and repeat")
    p.add_argument("--sample-steps", type=int, default=16, help="heun steps (2 NFE each)")
    p.add_argument("--repeats", type=int, default=3, help="sampling seeds (the table shows medians)")
    p.add_argument("--floor-draws", type=int, default=5, help="train subsets the noise floor is the median of")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    return p.parse_args(argv)


def train_model(args: argparse.Namespace, out: Path) -> tuple[torch.nn.Module, float, float]:
    """The conditional model (EMA weights, as genkit.load gives them), its training time and final loss."""
    train = load_labelled("digits")
    data = LabelledData(train.data.flatten(1), train.labels, train.class_names)
    torch.manual_seed(args.seed)
    model = FlowMatching(MLP(64, hidden=args.hidden, depth=args.depth, num_classes=11), num_classes=10,
                         class_names=train.class_names, class_dropout=args.class_dropout, sample_shape=(64,))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, warmup_steps=100, ema_decay=0.999,
                      log_every=max(1, args.steps // 10), seed=args.seed, out_dir=str(out), progress=False, cpu=True)
    t0 = time.perf_counter()
    result = Trainer(model, cfg).fit(data)
    return genkit.load(out), time.perf_counter() - t0, result.losses[-1][1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, train_s, loss = train_model(args, Path(tmp) / "run")
    print(f"trained {args.steps} steps in {train_s:.0f} s (final loss {loss:.4f})", flush=True)
    clf = metrics.train_digits_classifier(digits("train"), digits_labels("train"),
                                          generator=torch.Generator().manual_seed(args.seed))
    ref, floor = held_out("digits", args.n, args.seed)
    with torch.no_grad():
        ceiling = (clf(ref).argmax(1) == digits_labels("test")).float().mean().item()
    # the floor is itself a noisy estimate (359 samples, 64 features): report its spread over train subsets
    floors = [metrics.fid(floor, ref, clf.features)] + [
        metrics.fid(load_dataset("digits", n=len(floor), generator=torch.Generator().manual_seed(args.seed + 2 + k)),
                    ref, clf.features) for k in range(args.floor_draws - 1)]
    fd_floor = median(floors)
    labels = torch.arange(args.n) % 10
    runs: dict[str, list[dict[str, float]]] = {str(s): [] for s in scales}
    for r in range(args.repeats):
        for s in scales:
            t0 = time.perf_counter()
            x = model.sample(args.n, labels=labels, guidance=s, solver="heun", steps=args.sample_steps,
                             generator=torch.Generator().manual_seed(1000 + r))
            sample_s = time.perf_counter() - t0
            images = x.reshape(-1, 1, 8, 8).clamp(-1, 1)
            with torch.no_grad():
                acc = (clf(images).argmax(1) == labels).float().mean().item()
            fd = metrics.fid(images[:len(floor)], ref, clf.features)  # as many samples as the floor
            runs[str(s)].append({"accuracy": acc, "frechet": fd, "sample_s": sample_s})
            print(f"repeat {r} scale {s:g}: accuracy {acc:.3f}, Frechet {fd:.2f} (floor {fd_floor:.2f})", flush=True)
    rows, summary = [], []
    for s in scales:
        acc = median([v["accuracy"] for v in runs[str(s)]])
        fd = median([v["frechet"] for v in runs[str(s)]])
        summary.append({"scale": s, "accuracy": acc, "frechet": fd, "frechet_over_floor": fd / fd_floor})
        rows.append([f"{s:g}", f"{acc:.3f}", f"{fd:.2f}", f"{fd / fd_floor:.2f}"])
    best = min(summary, key=lambda v: v["frechet"])
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "hidden", "depth", "class_dropout", "n",
                                               "sample_steps", "repeats", "seed", "threads")}
    settings.update(scales=scales, model="FlowMatching, linear path, MLP on flattened 8x8 digits, 11 classes "
                                         "(10 + null), EMA 0.999", solver="heun", labels="i mod 10",
                    reference=f"digits test split ({len(ref)})", floor=f"train subset of {len(floor)}",
                    frechet_samples=len(floor))
    payload = {"settings": settings, "train_time_s": train_s, "final_loss": loss,
               "classifier_test_accuracy": ceiling, "frechet_noise_floor": fd_floor,
               "frechet_noise_floor_draws": floors, "runs": runs,
               "summary": summary}
    out = Path(args.out)
    plot(summary, fd_floor, (min(floors), max(floors)), ceiling, out / "bench_guidance.png", args)
    md = (f"Class-conditional flow matching on digits (MLP {args.hidden} x {args.depth}, {args.steps} steps of "
          f"{args.batch_size}, class dropout {args.class_dropout:g}, trained in {train_s:.0f} s); heun "
          f"{args.sample_steps} steps, {args.n} samples per scale (labels i mod 10), medians of {args.repeats} "
          "sampling seeds. Accuracy: the digits classifier reads the asked class (its accuracy on the real test "
          f"digits: {ceiling:.3f}). Frechet distance in its features to the {len(ref)} test digits, from the first "
          f"{len(floor)} samples; noise floor (train subsets of {len(floor)}, the first genkit.data.held_out's) "
          f"{fd_floor:.2f}, median of {len(floors)} subsets ranging {min(floors):.2f}-{max(floors):.2f}: a "
          "distance within that range is at the floor. Scale 0 is the "
          "unconditional model (null label), 1 the conditional one.\n\n"
          + markdown_table(["guidance scale", "class accuracy", "Frechet distance", "Frechet / floor"], rows)
          + f"\n\nLowest Frechet distance at scale {best['scale']:g} ({best['frechet']:.2f}, "
            f"{best['frechet_over_floor']:.2f}x the floor). Plot: `bench_guidance.png`.\n")
    json_path, md_path = write_results("bench_guidance", payload, md, out)
    print(f"wrote {json_path}, {md_path}, {out / 'bench_guidance.png'}")


def plot(summary: list[dict[str, float]], floor: float, spread: tuple[float, float], ceiling: float, path: Path,
         args: argparse.Namespace) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    s = [v["scale"] for v in summary]
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(s, [v["accuracy"] for v in summary], "o-", label="guided samples")
    ax.axhline(ceiling, color="gray", ls="--", label=f"real test digits ({ceiling:.3f})")
    ax.set(xlabel="guidance scale", ylabel="class accuracy", ylim=(0, 1.02), title="asked class recognised")
    ax.legend(loc="lower right", fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(s, [v["frechet"] for v in summary], "o-", color="C1", label="guided samples")
    ax.axhline(floor, color="gray", ls="--", label=f"noise floor ({floor:.2f}; band: its spread)")
    ax.axhspan(*spread, color="gray", alpha=0.2)
    ax.set(xlabel="guidance scale", ylabel="Frechet distance (classifier features)", title="distance to test digits")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"classifier-free guidance, conditional digits (flow matching, MLP, {args.steps} steps)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
