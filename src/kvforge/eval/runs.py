"""Run folders: where a run's files go, and the facts every run records (commit, device, versions)."""

from __future__ import annotations

import csv
import io
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
    """Versions recorded in every run's meta. kvforge's is the package's own `__version__`, so a run from a source
    tree (PYTHONPATH=src, no installed metadata) records it too instead of failing after its work is done."""
    import transformers

    from kvforge.config import VERSION

    return {"kvforge": VERSION, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def check_out(out: str | os.PathLike) -> Path:
    """`out` as a Path, after checking that it is (or can be made) a writable directory; creates nothing, so a run
    refused later leaves no trace."""
    path = Path(out)
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise KVForgeError(f"output directory {str(path)!r} is not writable: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KVForgeError(f"output directory {str(path)!r} is not writable: no write permission on "
                           f"{str(existing)!r}")
    return path


def differing_setting(old: dict, new: dict) -> tuple[str, object, object] | None:
    """The first setting both dicts record with different values: (name, old value, new value), or None. Values
    are compared as JSON would store them (a tuple equals a list)."""
    import json

    for key, value in new.items():
        if key in old and json.loads(json.dumps(old[key])) != json.loads(json.dumps(value)):
            return key, old[key], value
    return None


def refuse_other_settings(out: Path, old: dict, new: dict, what: str = "run") -> None:
    """One line naming the first setting that differs between the run in `out` and this one (both values)."""
    diff = differing_setting(old, new)
    if diff is not None:
        key, was, now = diff
        raise KVForgeError(f"{str(out)!r} holds a {what} made with {key}={was!r}, this one has {key}={now!r}; "
                           "resume with the same settings, choose another --out, or pass --overwrite to start clean")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv_atomic(path: str | os.PathLike, rows: list[dict], fields: list[str], restval: object = "") -> None:
    """`rows` as a CSV with columns `fields` (missing values `restval`), written as `write_text_atomic` does."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields, restval=restval)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


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
