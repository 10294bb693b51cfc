"""Model-side code: runs in the scoring job, under torch, on a loaded checkpoint.

Model internals are read only through an architecture adapter (:mod:`mechgen.model.adapter`:
:mod:`mechgen.model.gpt_neox` for GPT-NeoX / Pythia, :mod:`mechgen.model.gpt2` for GPT-2);
the table-side analyses never import this package.
"""
