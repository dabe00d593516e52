"""The dataset registry: a dataset is one entry, like a method.

An entry names its loader and the files that pin it. ``source_files(data_dir)`` maps file
names to their content: ``bytes`` for a file the project exports itself (the pipeline checks
a tracked copy against a fresh export), a ``Path`` for a file the user supplies (the pipeline
keeps a copy under version control and loads from that copy). A dataset with no source files
is pinned by a fingerprint of what it loads (a file dataset's ``source_digest``: its index).
``options`` names the loader's keyword options (``image_size``, ``channels``) that
``params.yaml``'s dataset section may set; other datasets refuse them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .core import DatasetError, ImageDataset

Loader = Callable[..., ImageDataset]  # (data_dir: Path | None, **options)
SourceFiles = Callable[[Path | None], dict[str, "bytes | Path"]]


def _no_files(_data_dir: Path | None) -> dict[str, bytes | Path]:
    return {}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    load: Loader
    summary: str
    needs_data_dir: bool = False
    source_files: SourceFiles = _no_files
    options: tuple[str, ...] = ()


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(name: str, summary: str, needs_data_dir: bool = False,
                     source_files: SourceFiles = _no_files,
                     options: tuple[str, ...] = ()) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = DatasetInfo(name, fn, summary, needs_data_dir, source_files, options)
        return fn
    return deco


def list_datasets() -> list[str]:
    return list(_REGISTRY)


def get_dataset(name: str) -> DatasetInfo:
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 **options: int) -> ImageDataset:
    """Load a registered dataset by name; ``data_dir`` is required where the entry says so.

    ``options`` (``image_size``, ``channels``) go to loaders that take them; a non-zero one
    for a dataset that does not is an error."""
    info = get_dataset(name)
    if info.needs_data_dir and not data_dir:
        raise DatasetError(f"{name} needs a data directory (--data-dir, or dataset.data_dir "
                           "in params.yaml)")
    unused = sorted(k for k, v in options.items() if v and k not in info.options)
    if unused:
        takers = [n for n, i in _REGISTRY.items() if unused[0] in i.options]
        raise DatasetError(f"dataset.{unused[0]} does not apply to {name} (only to "
                           f"{', '.join(takers) or 'no dataset'})")
    kwargs = {k: v for k, v in options.items() if k in info.options}
    return info.load(Path(data_dir) if data_dir else None, **kwargs)
