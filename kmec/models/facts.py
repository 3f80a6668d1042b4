"""``ModelFacts``: the planner's only view of a model (no weights).

Contents:
    ModelFacts          architecture, sizes, dtype, fingerprint
    facts_from_config() build ModelFacts from a Hugging Face config
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from kmec.models.adapters import adapter_for


class ModelFacts(BaseModel):
    """What the planner may know about a model.

    Attributes:
        name: the reference the user gave (alias, folder or hub id).
        arch: the Hugging Face architecture class, e.g. ``LlamaForCausalLM``.
        model_type: ``config.model_type`` (selects the ArchAdapter).
        family: adapter family name.
        n_layers, d_model, d_mlp, vocab_size: sizes.
        dtype: parameter dtype as a string (``float32``).
        tied_embeddings: whether the unembedding shares the embedding matrix.
        fingerprint: sha256 over config and weights ("" when unknown).
        n_params: parameter count (0 when unknown).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    arch: str
    model_type: str
    family: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    dtype: str = "float32"
    tied_embeddings: bool = False
    fingerprint: str = ""
    n_params: int = 0


def facts_from_config(
    config: Any, *, name: str, fingerprint: str = "", n_params: int = 0, dtype: str | None = None
) -> ModelFacts:
    """Build :class:`ModelFacts` from a Hugging Face ``PretrainedConfig``.

    Raises:
        ModelError: the architecture is not supported.
    """
    adapter = adapter_for(config.model_type)
    d_model = int(getattr(config, adapter.d_model_attr))
    d_mlp = getattr(config, adapter.d_mlp_attr, None) if adapter.d_mlp_attr else None
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    if dtype is None:
        raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dtype = str(raw).removeprefix("torch.")
    return ModelFacts(
        name=name,
        arch=archs[0],
        model_type=config.model_type,
        family=adapter.family,
        n_layers=int(getattr(config, adapter.n_layers_attr)),
        d_model=d_model,
        d_mlp=int(d_mlp) if d_mlp else 4 * d_model,
        vocab_size=int(config.vocab_size),
        dtype=dtype,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        fingerprint=fingerprint,
        n_params=n_params,
    )
