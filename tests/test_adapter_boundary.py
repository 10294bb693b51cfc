"""Nothing outside mechgen/model/ touches a model's internals: every weight, module and config
field of a loaded model is read through its architecture adapter (mechgen.model.adapter), so a
new family is one adapter, not edits across the package."""

from __future__ import annotations

import ast
from pathlib import Path

import mechgen

PACKAGE = Path(mechgen.__file__).parent

MODEL_ATTRIBUTES = frozenset(
    {
        # the causal LM and its body, in any family
        "base_model", "config", "get_output_embeddings", "get_input_embeddings", "lm_head",
        "num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size",
        "max_position_embeddings", "_attn_implementation", "model_type",
        # GPT-NeoX modules
        "gpt_neox", "layers", "attention", "query_key_value", "dense", "embed_in", "embed_out",
        "input_layernorm", "post_attention_layernorm", "final_layer_norm", "mlp",
        "use_parallel_residual",
        # GPT-2 modules
        "transformer", "h", "attn", "c_attn", "c_proj", "c_fc", "wte", "wpe", "ln_1", "ln_2",
        "ln_f", "n_layer", "n_head", "n_embd", "n_positions",
    }
)  # fmt: skip
"""Attribute names that only a transformers model (or its config) has in this package."""


ADAPTER_NAMES = frozenset({"adapter", "family"})
"""Variables that hold an architecture adapter (``adapter = architectures.for_model(model)``):
``adapter.attention(model, layer)`` is the adapter's method, not a model attribute; or a
family's torch-free metadata (``family``, a :class:`mechgen.architectures.Family`), whose
``model_type`` field names the checkpoints of the family, read before any model is loaded."""


def model_attribute_uses(path: Path) -> list[str]:
    """``file:line: .name`` of every attribute access ``x.name`` with name in
    :data:`MODEL_ATTRIBUTES`, except on an adapter (:data:`ADAPTER_NAMES`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in MODEL_ATTRIBUTES
        and not (isinstance(node.value, ast.Name) and node.value.id in ADAPTER_NAMES)
    ]


def test_only_the_model_package_touches_model_attributes() -> None:
    outside = [
        path for path in sorted(PACKAGE.rglob("*.py")) if (PACKAGE / "model") not in path.parents
    ]
    assert len(outside) > 20  # the walk found the package
    uses = [use for path in outside for use in model_attribute_uses(path)]
    assert not uses, "model internals outside mechgen/model/:\n" + "\n".join(uses)


def test_the_check_sees_a_model_attribute() -> None:
    """The check is not vacuous: the accesses the adapters replaced are found."""
    probe = PACKAGE / "model" / "gpt2.py"
    found = {use.rsplit(".", 1)[1] for use in model_attribute_uses(probe)}
    assert {"c_attn", "c_proj", "wte", "config"} <= found
