"""Architecture knowledge as data: one ``ArchAdapter`` row per model family.

Contents:
    ArchAdapter       module-path templates for the sites kmec touches, plus
                      the declared weight layout of the MLP output projection
    ADAPTERS          model_type -> ArchAdapter
    adapter_for()     look up the adapter for a config's ``model_type``
    plain_head()      whether a family's logits are exactly ``lm_head(last hidden state)``

A *site* is an abstract place in the network. Backends and the statistics
engine name sites (``mlp_out`` at layer 7) and the adapter turns them into
module paths (``model.layers.7.mlp.down_proj``), so no code outside this file
sniffs model names.

``weight_layout`` says how the MLP output projection stores its weight:
``"out_in"`` for ``nn.Linear`` (``W @ k``) and ``"in_out"`` for GPT-2's
``Conv1D`` (``k @ W``). A rank-one update ``u vᵀ`` (u in the output space, v in
the key space) is added as ``u vᵀ`` or ``v uᵀ`` accordingly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from kmec.errors import ModelError, did_you_mean


class ArchAdapter(BaseModel):
    """Where things live in one model family.

    Attributes:
        family: family name used in plans and layer tables.
        layers: path of the module list of transformer blocks.
        layer: template of one block (``{}`` is the layer index).
        mlp_out: template of the MLP output projection; its *input* is the MLP
            key ``k`` and its output the value added to the residual stream.
        mlp: template of the whole MLP module.
        attn: template of the attention module.
        embed: path of the token embedding.
        final_norm: path of the final normalisation before the unembedding.
        lm_head: path of the unembedding (may be tied to ``embed``).
        weight_layout: how ``mlp_out.weight`` is stored (see module docstring).
        d_mlp_attr: config attribute holding the MLP width (None: 4 × d_model).
        plain_head: the causal-LM head is exactly ``lm_head(base_model(x).last_hidden_state)``
            (no logit scaling or soft-capping), so the verifier may run the head on
            the positions it reads only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    layers: str
    layer: str
    mlp_out: str
    mlp: str
    attn: str
    embed: str
    final_norm: str
    lm_head: str
    weight_layout: Literal["out_in", "in_out"]
    d_mlp_attr: str | None
    n_layers_attr: str
    d_model_attr: str
    plain_head: bool = True

    def site(self, name: str, layer: int | None = None) -> str:
        """Module path of an abstract site, e.g. ``site("mlp_out", 3)``.

        >>> ADAPTERS["llama"].site("mlp_out", 3)
        'model.layers.3.mlp.down_proj'
        """
        template = getattr(self, name)
        if "{}" in template:
            if layer is None:
                raise ValueError(f"site {name!r} needs a layer index")
            return template.format(layer)
        return template


_LLAMA = ArchAdapter(
    family="llama",
    layers="model.layers",
    layer="model.layers.{}",
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp="model.layers.{}.mlp",
    attn="model.layers.{}.self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    weight_layout="out_in",
    d_mlp_attr="intermediate_size",
    n_layers_attr="num_hidden_layers",
    d_model_attr="hidden_size",
)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA.model_copy(update={"family": "mistral"}),
    "qwen2": _LLAMA.model_copy(update={"family": "qwen2"}),
    "gpt2": ArchAdapter(
        family="gpt2",
        layers="transformer.h",
        layer="transformer.h.{}",
        mlp_out="transformer.h.{}.mlp.c_proj",
        mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        weight_layout="in_out",
        d_mlp_attr="n_inner",
        n_layers_attr="n_layer",
        d_model_attr="n_embd",
    ),
    "gptj": ArchAdapter(
        family="gptj",
        layers="transformer.h",
        layer="transformer.h.{}",
        mlp_out="transformer.h.{}.mlp.fc_out",
        mlp="transformer.h.{}.mlp",
        attn="transformer.h.{}.attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        weight_layout="out_in",
        d_mlp_attr="n_inner",
        n_layers_attr="n_layer",
        d_model_attr="n_embd",
    ),
    "gpt_neox": ArchAdapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        layer="gpt_neox.layers.{}",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        mlp="gpt_neox.layers.{}.mlp",
        attn="gpt_neox.layers.{}.attention",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # "embed_out" before transformers 5
        weight_layout="out_in",
        d_mlp_attr="intermediate_size",
        n_layers_attr="num_hidden_layers",
        d_model_attr="hidden_size",
    ),
}


def adapter_for(model_type: str) -> ArchAdapter:
    """Return the adapter for a Hugging Face ``config.model_type``.

    Raises:
        ModelError: the architecture is not supported; the message names the
            supported ones.
    """
    try:
        return ADAPTERS[model_type]
    except KeyError:
        hint = did_you_mean(model_type, ADAPTERS)
        supported = ", ".join(sorted(ADAPTERS))
        raise ModelError(
            f"unsupported architecture {model_type!r}; kmec supports: {supported}",
            hint=hint or "add an ArchAdapter row in kmec/models/adapters.py",
        ) from None


def plain_head(model_type: str) -> bool:
    """Whether the family's logits are ``lm_head`` of the body's last hidden state (False for
    families kmec has no adapter for: the verifier then runs the whole model).

    >>> plain_head("llama"), plain_head("gemma2")
    (True, False)
    """
    return model_type in ADAPTERS and ADAPTERS[model_type].plain_head
