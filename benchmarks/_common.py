"""Shared helpers for the benchmark scripts: environment metadata, Markdown tables, result files.

Every script ends with ``write_results(name, rows, meta)``, which writes ``<name>.json`` (rows plus
the environment they were measured in) and ``<name>.md`` (the same as a Markdown table), so a number
never travels without the device, torch and triton versions that produced it. They go to a scratch
folder (``SCRATCH_DIR``) unless ``--output-dir`` says otherwise: the committed results in
``benchmarks/results/`` (``RESULTS_DIR``) change only when asked to, e.g. ``--output-dir
benchmarks/results`` or ``gpu_session.sh``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRATCH_DIR = Path(tempfile.gettempdir()) / "nextvlad_bench_results"


def device_name(device: torch.device | str) -> str:
    """Human-readable device: the GPU's name, or the CPU's model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores)"


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it (torch does not expose it)."""
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "driver": nvidia_driver() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        # CPU timings on a shared machine are only as good as its load when they were taken.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.3e}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as a GitHub Markdown table (columns default to the first row's keys)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    output_dir: Path | str | None = None,
) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``output_dir`` (default ``SCRATCH_DIR``).

    ``meta`` should hold at least what ``environment()`` returns (device, torch, triton) plus the
    benchmark's own settings. Returns the written paths by suffix ("json", "md").
    """
    directory = Path(output_dir) if output_dir is not None else SCRATCH_DIR
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps({"name": name, "meta": meta, "rows": list(rows)}, indent=2, default=str) + "\n")
    header = [f"# {name}", ""] + [f"- {key}: {_format_cell(value)}" for key, value in meta.items()] + [""]
    markdown_path = directory / f"{name}.md"
    markdown_path.write_text("\n".join(header) + markdown_table(rows, columns))
    return {"json": json_path, "md": markdown_path}


def print_targets(targets: Sequence[Mapping[str, Any]], context: str = "") -> None:
    """One ``TARGET PASS|FAIL|N/A`` line per target dict (target, value, relation, bound, passed),
    the lines gpu_session.sh collects into its summary."""
    for target in targets:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[target["passed"]]
        value = "not measured" if target["value"] is None else f"{target['value']:.4g}"
        where = f" ({context})" if context else ""
        print(f"TARGET {verdict} {target['target']}{where}: {value} {target['relation']} {target['bound']}")
