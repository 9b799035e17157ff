"""The built-in corpora by name, and how a dataset spec (``mnist``, ``mnist:test``, a path) is read.

The corpus modules mark their loaders with :func:`~raeflow.data.core.register_dataset`; this module imports every
one of them and collects the marks, so ``known_datasets`` and ``parse_spec`` give the same answer whatever was
imported before. A new corpus module is added to ``_MODULES``.
"""
from __future__ import annotations

from raeflow.data import images, text
from raeflow.data.core import BuiltinDataset

_MODULES = (images, text)
_BUILTIN: dict[str, BuiltinDataset] = {
    f.builtin.name: f.builtin for m in _MODULES for f in vars(m).values()
    if isinstance(getattr(f, "builtin", None), BuiltinDataset)}


def known_datasets() -> dict[str, BuiltinDataset]:
    return dict(_BUILTIN)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"mnist:test"`` -> ``("mnist", "test")``; a path or bare name -> ``(spec, None)``."""
    if ":" in spec and spec.split(":", 1)[0] in _BUILTIN:
        name, split = spec.split(":", 1)
        return name, split
    return spec, None


def builtin_split(name: str, split: str) -> BuiltinDataset:
    """The built-in dataset ``name``, after checking it has ``split`` (the one message for every reader)."""
    from raeflow.errors import InputError

    ds = _BUILTIN[name]
    if split not in ds.splits:
        raise InputError(f"dataset {name!r} has no split {split!r}; it has {list(ds.splits)}")
    return ds
