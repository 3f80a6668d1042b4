"""Units of the planner's cost model: FLOPs per token-forward, activations, parameters.

Contents:
    CPU_FLOPS / FWD_BWD / PROMPT_TOKENS / MB / BYTES   calibration constants
    model_params()     the model's parameter count (estimated from sizes when unknown)
    params_through()   parameters a forward pass touches when it stops after a layer
    seconds()          seconds for ``token_forwards`` tokens through ``params`` parameters
    activations_mb()   MB of activations kept for backward for ``tokens`` tokens

The unit is a *token-forward*: one token through the whole model costs about
``2 · n_params`` FLOPs. ``CPU_FLOPS`` is calibrated on the measurement in
DESIGN.md (SmolLM2-135M, fp32, 2 cores: ~540 tokens/s → 540 × 2 × 134.5 M ≈
1.45e11 FLOP/s). A backward pass costs about two forwards (``FWD_BWD = 3``).
Each backend's own cost model (its :class:`~kmec.planner.backend_info.BackendInfo`)
is written in these units; :mod:`kmec.planner.passes.estimate_cost` adds the
statistics pass.
"""

from __future__ import annotations

from kmec.models.facts import ModelFacts

CPU_FLOPS = 1.45e11
FWD_BWD = 3.0
PROMPT_TOKENS = 16  # a rendered prompt plus its target, typically
GATED = ("llama", "mistral", "qwen2")  # gate, up and down projections
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
MB = 1024 * 1024


def model_params(facts: ModelFacts) -> int:
    """``facts.n_params``, or an estimate from the sizes when it is unknown (0).

    >>> from kmec.planner.draft import example_facts
    >>> model_params(example_facts().model_copy(update={"n_params": 0}))
    147750912
    """
    if facts.n_params:
        return facts.n_params
    embed = facts.vocab_size * facts.d_model * (1 if facts.tied_embeddings else 2)
    return facts.n_layers * _layer_params(facts) + embed


def _layer_params(facts: ModelFacts) -> int:
    mats = 3 if facts.family in GATED else 2
    return 4 * facts.d_model * facts.d_model + mats * facts.d_model * facts.d_mlp


def params_through(facts: ModelFacts, layer: int) -> float:
    """Parameters a forward pass touches when it stops after ``layer``."""
    total = model_params(facts)
    embed = facts.vocab_size * facts.d_model
    per_layer = max(total - embed, 0) / facts.n_layers
    return embed + per_layer * (layer + 1)


def seconds(token_forwards: float, params: float) -> float:
    """Seconds for ``token_forwards`` tokens through ``params`` parameters on this CPU."""
    return token_forwards * 2 * params / CPU_FLOPS


def activations_mb(facts: ModelFacts, tokens: float) -> float:
    """MB of activations a forward keeps for its backward pass, for ``tokens`` tokens."""
    return tokens * facts.n_layers * (4 * facts.d_model + 2 * facts.d_mlp) * 4 / MB
