"""The variant registry: a variant is one file that decorates its class with ``@register_model``.

``register_model`` also records the constructor's arguments as the model's config (as diffusers does with
``register_to_config``): whatever you pass to ``__init__`` is exactly what ``config.json`` saves and what
``load_model`` passes back, so a saved model cannot drift from the code that builds it.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn
from raeflow.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class VariantInfo:
    name: str
    cls: type
    summary: str  # one line for `raeflow variants`
    kind: str  # "autoencoder" (in list_variants) or "classifier" (fine-tuned heads, built by `finetune`)


_REGISTRY: dict[str, VariantInfo] = {}
_LOADED = False


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def register_model(name: str, summary: str = "", kind: str = "autoencoder") -> Callable[[type], type]:
    """Class decorator: registers ``cls`` under ``name`` and makes its ``__init__`` record ``self.config``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ConfigError(f"variant {name!r} is registered twice ({_REGISTRY[name].cls} and {cls})")
        init = cls.__init__
        sig = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kwargs):
            bound = sig.bind(self, *args, **kwargs)
            bound.apply_defaults()
            cfg = {k: _jsonable(v) for k, v in bound.arguments.items() if k != "self"}
            init(self, *args, **kwargs)
            # Set after init (nn.Module.__init__ must run first). When a registered class subclasses another,
            # the outermost __init__ finishes last, so the config saved is the one of the class built.
            object.__setattr__(self, "config", cfg)

        cls.__init__ = recording_init
        cls.variant = name
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = VariantInfo(name, cls, summary or (doc[0] if doc else ""), kind)
        return cls

    return wrap


def unregister_model(name: str) -> None:
    """Forget variant ``name`` (a test that registered a variant of its own removes it again, so it never leaks
    into other tests' ``list_variants()`` parametrisation)."""
    _REGISTRY.pop(name, None)


def _load_builtin_variants() -> None:
    """Import every module in ``raeflow.models`` so each variant file registers itself."""
    global _LOADED
    if _LOADED:
        return
    import raeflow.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"raeflow.models.{mod.name}")
    _LOADED = True


def get_variant(name: str) -> VariantInfo:
    _load_builtin_variants()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownNameError(f"unknown variant {name!r}; known variants: {known}")
    return _REGISTRY[name]


def list_variants(kind: str = "autoencoder") -> list[str]:
    """Names of the registered variants of ``kind`` (autoencoders by default), sorted."""
    _load_builtin_variants()
    return sorted(n for n, v in _REGISTRY.items() if v.kind == kind)


def variant_summaries() -> dict[str, str]:
    _load_builtin_variants()
    return {n: _REGISTRY[n].summary for n in list_variants()}


def build_model(name: str, **config: Any) -> nn.Module:
    """Build variant ``name`` from its constructor arguments (the same dict ``config.json`` stores)."""
    info = get_variant(name)
    try:
        return info.cls(**config)
    except TypeError as e:
        params = [p for p in inspect.signature(info.cls.__init__).parameters if p != "self"]
        raise ConfigError(f"cannot build variant {name!r} from {sorted(config)}: {e}. It accepts: {params}") from e
