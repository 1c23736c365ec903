"""Finds and loads the compiled extension ``deep_ep_py._C``; never raises at import.

The extension is optional: a build without nvcc or NVSHMEM installs pure Python, and the reference backend serves
every call. ``has_kernels()`` says whether the kernels are there, ``kernels_unavailable_reason()`` why not.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from types import ModuleType

__all__ = ["gpu_available", "has_kernels", "kernels_unavailable_reason", "load_extension"]

_NVSHMEM_HOST_LIBRARY = "libnvshmem_host.so.3"

_loaded = False
_extension: ModuleType | None = None
_unavailable_reason = ""


def _preload_nvshmem_host() -> str | None:
    """Loads libnvshmem_host.so.3 from the installed nvidia-nvshmem wheel with RTLD_GLOBAL, so the extension
    resolves it whatever its build-time rpath says (pip's isolated build env is gone by now). NVSHMEM_HOME, when
    set, wins, as it does in the build. Returns an error text, or None when loaded (or nothing to load: the
    extension's own rpath then gets its chance)."""
    candidates = []
    nvshmem_home = os.environ.get("NVSHMEM_HOME")
    if nvshmem_home:
        candidates.append(os.path.join(nvshmem_home, "lib", _NVSHMEM_HOST_LIBRARY))
    try:
        import nvidia.nvshmem as nvshmem_package

        candidates.extend(os.path.join(path, "lib", _NVSHMEM_HOST_LIBRARY) for path in nvshmem_package.__path__)
    except ImportError:
        pass
    errors = []
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return None
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    return "; ".join(errors) or None


def _installed_extension_path() -> str | None:
    """The _C of the installed deep_ep_py distribution, when this package is imported from elsewhere (a source
    checkout on sys.path ahead of site-packages: `python -m bench` or `python -m pytest` in a clone after
    `pip install .`). The checkout's Python then drives the installed build's kernels."""
    try:
        distribution = metadata.distribution("deep_ep_py")
    except metadata.PackageNotFoundError:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    for file in distribution.files or ():
        if file.parent.name == "deep_ep_py" and file.name.startswith("_C.") and file.name.endswith(".so"):
            path = os.path.abspath(str(distribution.locate_file(file)))
            if os.path.dirname(path) != here and os.path.exists(path):
                return path
    return None


def _load_from(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("deep_ep_py._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["deep_ep_py._C"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["deep_ep_py._C"]
        raise
    return module


def extension_path() -> str | None:
    """Where the loaded deep_ep_py._C came from (None when not loaded)."""
    extension = load_extension()
    return getattr(extension, "__file__", None) if extension is not None else None


def load_extension() -> ModuleType | None:
    """Returns ``deep_ep_py._C``, or None when it is not built or cannot load (see kernels_unavailable_reason()).
    Cached: the import is tried once per process."""
    global _loaded, _extension, _unavailable_reason
    if _loaded:
        return _extension
    _loaded = True
    preload_error = _preload_nvshmem_host()
    try:
        try:
            _extension = importlib.import_module("deep_ep_py._C")
        except ModuleNotFoundError as exc:
            installed = _installed_extension_path() if exc.name == "deep_ep_py._C" else None
            if installed is None:
                raise
            _extension = _load_from(installed)
    except ModuleNotFoundError as exc:
        if exc.name != "deep_ep_py._C":
            _unavailable_reason = f"deep_ep_py._C failed to import: {exc!r}"
        else:
            package_dir = os.path.dirname(os.path.abspath(__file__))
            _unavailable_reason = (
                f"no deep_ep_py._C in {package_dir}: deep_ep_py was installed (or is imported from a source tree) "
                "without its CUDA extension (no nvcc or NVSHMEM at build time); reinstall with the CUDA toolkit "
                "on PATH and nvidia-nvshmem-cu13 installed"
            )
    except Exception as exc:  # an ImportError from the loader, or anything the module init raised
        _unavailable_reason = f"deep_ep_py._C failed to import: {exc!r}"
        if preload_error:
            _unavailable_reason += f" (preloading {_NVSHMEM_HOST_LIBRARY} failed: {preload_error})"
    return _extension


def has_kernels() -> bool:
    """True when the CUDA extension is built and importable (a GPU may still be missing: see gpu_available())."""
    return load_extension() is not None


def kernels_unavailable_reason() -> str:
    """Why has_kernels() is False; empty when it is True."""
    load_extension()
    return _unavailable_reason


def gpu_available() -> bool:
    """True when the kernels are built and at least one CUDA device is visible."""
    extension = load_extension()
    if extension is None:
        return False
    try:
        return extension.device_count() > 0
    except Exception:
        return False
