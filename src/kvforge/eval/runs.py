"""Run folders: where a run's files go, and the facts every run records (commit, device, versions)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from kvforge.errors import KVForgeError


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(model) -> str:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    import importlib.metadata

    import transformers

    return {"kvforge": importlib.metadata.version("kvforge"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def prepare_out(out: str | os.PathLike) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise KVForgeError(f"output directory {str(path)!r} is not writable: {e.strerror}") from None
    return path


def drop_partial_line(results: Path) -> None:
    """An interrupt can cut the last line short: drop it so appended records start on a fresh line."""
    if not results.exists():
        return
    data = results.read_bytes()
    if data and not data.endswith(b"\n"):
        results.write_bytes(data[: data.rfind(b"\n") + 1])
