"""The registry of architecture adapters (:class:`mechgen.model.base.ArchitectureAdapter`), by
family name (the suite key ``architecture``) and by transformers ``config.model_type``.

Every model-side module reads a loaded model only through :func:`for_model`; nothing outside
:mod:`mechgen.model` touches a model attribute (tests/test_adapter_boundary.py enforces it).
A new family is one module here (its adapter) plus one line in :data:`ADAPTERS`.
"""

from __future__ import annotations

import torch

from mechgen.model import gpt2, gpt_neox
from mechgen.model.base import ArchitectureAdapter

ADAPTERS: dict[str, ArchitectureAdapter] = {
    gpt_neox.ADAPTER.name: gpt_neox.ADAPTER,
    gpt2.ADAPTER.name: gpt2.ADAPTER,
}
"""Adapters by family name."""

ARCHITECTURES = tuple(ADAPTERS)
"""The allowed values of the suite key ``architecture``."""


def get(name: str) -> ArchitectureAdapter:
    """The adapter of family ``name``; a ``KeyError`` lists the allowed names."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(
            f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}"
        ) from None


def for_model_type(model_type: str | None, what: str = "a model") -> ArchitectureAdapter:
    """The adapter of a transformers ``model_type`` (``config.json``'s ``model_type``)."""
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise TypeError(
        "expected a transformers GPT-NeoX or GPT-2 model (model_type one of "
        f"{[t for a in ADAPTERS.values() for t in a.model_types]}); got {what} "
        f"(model_type {model_type!r})"
    )


def for_model(model: torch.nn.Module) -> ArchitectureAdapter:
    """The adapter that reads ``model``, chosen by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return for_model_type(model_type, type(model).__name__)
