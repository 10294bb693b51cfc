"""What varies between the runs of a suite: the data order, the initialisation, or both.

A PolyPythia seed changes two things at once, the weight initialisation and the order of the
training data. The decoupled runs separate them (``pythia-160m-data-seed{1,2,3}``: only the data
order varies, ``pythia-160m-weight-seed{1,2,3}``: only the initialisation). A suite says which
kind each of its sizes is under ``variation`` (config.yaml), never by parsing run names::

    variation:
      160m:        {kind: full}
      160m-data:   {kind: data, base: 160m, seeds: [1, 2, 3]}
      160m-weight: {kind: weight, base: 160m, seeds: [1, 2, 3]}

``base`` is the size the variant belongs to (its architecture; for the toy source the entry of
``toy.sizes`` it trains), ``seeds`` overrides the suite's ``seeds`` for that size. For a toy
suite the seed held fixed is given: a ``data`` variant's ``weight_seed`` (the shared init) and a
``weight`` variant's ``data_seed`` (the shared data order). A suite without ``variation`` has
only full seeds (both seeds = the run's seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VARIATION_KINDS = ("full", "data", "weight")
"""full: data order and initialisation both vary with the seed; data: only the data order
varies (the init is shared); weight: only the initialisation varies (the data order is shared)."""


@dataclass(frozen=True)
class Variation:
    """How one run relates to its siblings.

    ``data_seed``/``weight_seed``: the toy trainer's two seeds (None where the source does not
    say, as on the hub). ``init_group``: runs with the same value are expected to start from the
    same weights (their step 0 identical); every other pair is expected to differ.
    """

    kind: str
    base_size: str
    data_seed: int | None
    weight_seed: int | None
    init_group: str


def size_entry(spec: Mapping[str, Any], size: str) -> Mapping[str, Any]:
    """The ``variation`` entry of ``size`` (``{kind: full}`` when the suite has none)."""
    return (spec.get("variation") or {}).get(size, {"kind": "full"})


def size_seeds(spec: Mapping[str, Any], size: str) -> list[int]:
    """The seeds of ``size``: its ``variation`` entry's ``seeds``, else the suite's."""
    entry = size_entry(spec, size)
    return list(entry.get("seeds", spec.get("seeds", [])))


def run_variation(spec: Mapping[str, Any], size: str, seed: int, run: str) -> Variation:
    """The :class:`Variation` of the run ``run`` (size ``size``, seed ``seed``) of a suite.

    Seeds: full: data_seed = weight_seed = seed; data: data_seed = seed, weight_seed = the
    entry's ``weight_seed`` (None if absent); weight: weight_seed = seed, data_seed = the
    entry's ``data_seed``. Init group: ``<base>:w<weight_seed>`` when the weight seed is known;
    otherwise ``<base>:data-init`` for every data variant (they share one init by definition)
    and the run id for the others (each its own init).
    """
    entry = size_entry(spec, size)
    kind = entry["kind"]
    base = entry.get("base", size)
    if kind == "full":
        data_seed, weight_seed = seed, seed
    elif kind == "data":
        data_seed, weight_seed = seed, entry.get("weight_seed")
    else:
        data_seed, weight_seed = entry.get("data_seed"), seed
    if spec.get("source") != "toy" and kind != "data":
        # The hub does not say which init seed a run used; only the data variants are known to
        # share one.
        group = run
    elif weight_seed is not None:
        group = f"{base}:w{weight_seed}"
    else:
        group = f"{base}:data-init" if kind == "data" else run
    return Variation(kind, base, data_seed, weight_seed, group)


def variation_problem(
    spec: Mapping[str, Any], key: str, toy_sizes: Mapping[str, Any]
) -> str | None:
    """Why a suite's ``variation`` is invalid (the message names the key), or None.

    Every size of ``sizes`` needs an entry and every entry a size; a toy suite's ``base`` must
    be a toy size (the size itself when no base is given); a toy ``data`` variant needs its
    fixed ``weight_seed`` and a toy ``weight`` variant its fixed ``data_seed``; a ``full`` entry
    takes neither.
    """
    variation = spec.get("variation")
    if not variation:
        return None
    sizes = list(spec.get("sizes", []))
    missing = [s for s in sizes if s not in variation]
    if missing:
        return (
            f"config key '{key}.variation': size(s) {', '.join(missing)} have no entry; "
            f"every size of '{key}.sizes' needs one (kinds: {', '.join(VARIATION_KINDS)})"
        )
    extra = [s for s in variation if s not in sizes]
    if extra:
        return (
            f"config key '{key}.variation': {', '.join(extra)} not in '{key}.sizes' "
            f"(allowed: {', '.join(sizes)})"
        )
    for size, entry in variation.items():
        where = f"{key}.variation.{size}"
        kind = entry["kind"]
        if kind == "full" and ("data_seed" in entry or "weight_seed" in entry):
            return f"config key '{where}': a full-seed entry takes no data_seed/weight_seed"
        if kind == "data" and "data_seed" in entry:
            return f"config key '{where}.data_seed': a data variant's data seed is its run seed"
        if kind == "weight" and "weight_seed" in entry:
            return f"config key '{where}.weight_seed': a weight variant's init seed is its run seed"
        if spec.get("source") == "toy":
            base = entry.get("base", size)
            if base not in toy_sizes:
                return (
                    f"config key '{where}.base': unknown toy size {base!r}; "
                    f"allowed: {', '.join(toy_sizes)}"
                )
            fixed = {"data": "weight_seed", "weight": "data_seed"}.get(kind)
            if fixed and fixed not in entry:
                return f"config key '{where}.{fixed}' is required for a toy {kind} variant"
    return None
