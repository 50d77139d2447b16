"""What every benchmark under ``eval/`` records: the command, the machine, package versions, and the
results as JSON plus a markdown table in ``eval/results/``.

Benchmarks are scripts, not tests: run them as ``python eval/<name>.py``; this module sits next to them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RESULTS", "machine_info", "median", "write_results", "markdown_table"]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """The machine and software a result was measured on."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "versions": {p: _version(p) for p in ("genkit", "accelerate", "diffusers", "torchcfm", "numpy")},
        "git_commit": _git("rev-parse", "HEAD") or "none (no commit yet)",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<name>.json`` (payload + command + machine) and ``<name>.md`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    machine = machine_info()
    record = {"benchmark": name, "command": command, "machine": machine, **payload}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    head = (f"# {name}\n\nCommand: `{command}`\n\nMachine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
            f"{('GPU ' + machine['gpu'] + ', ') if machine.get('gpu') else ''}"
            f"torch {machine['torch']} ({machine['torch_threads']} thread(s)), genkit {machine['versions']['genkit']}, "
            f"git {machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}, {machine['date_utc']}.\n\n")
    md_path.write_text(head + markdown.rstrip() + "\n", encoding="utf-8")
    return json_path, md_path
