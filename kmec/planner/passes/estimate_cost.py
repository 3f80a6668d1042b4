"""Pass ``estimate_cost``: rough seconds and peak memory of each step, from sizes alone.

The unit is a *token-forward*: one token through the whole model costs about
``2 · n_params`` FLOPs. ``CPU_FLOPS`` is calibrated on the measurement in
DESIGN.md (SmolLM2-135M, fp32, 2 cores: ~540 tokens/s → 540 × 2 × 134.5 M ≈
1.45e11 FLOP/s). A backward pass costs about two forwards (``FWD_BWD = 3``).

Per step (``n`` edits, ``s`` scope prompts in all, ``L`` layers):

* statistics, on first use only: ``tokens`` forwards through the layers up
  to the deepest requested one (the pass stops there);
* ROME / MEMIT / AlphaEdit: per edit ``VALUE_STEPS`` forward+backward passes
  over ``CONTEXTS`` prompts (the value optimisation) plus key forwards at each
  layer, and a ``d_mlp³`` solve per layer; AlphaEdit adds an eigendecomposition
  per layer (about ``10 · d_mlp³``) on first use;
* fine-tuning: at most ``FT_STEPS`` forward+backward passes over the edit and
  scope prompts plus a KL forward over the preserve prompts, training one MLP
  output matrix per layer;
* memory: ``MEMORY_STEPS`` value-training iterations (typical early stop)
  over its prompts, each under ``MEMORY_CONTEXTS`` context prefixes;
* retrieval: one pass of the sentence encoder (``EMBEDDER_PARAMS``) over the
  edit, scope and preserve prompts (each with its last sentence);
* MEND: one forward+backward per edit, plus training the editor
  (``MEND_TRAIN_STEPS`` steps) when none is registered for the model.

Peak memory is the weights plus what the step holds at once: activations kept
for backward (``tokens × layers × (4·d_model + 2·d_mlp)`` floats), ``C`` per
layer, optimiser state for fine-tuned matrices; the statistics pass is
forward-only, so it holds one block's activations for one batch plus its
accumulators. These are rough planning estimates, not promises.
"""

from __future__ import annotations

from kmec.models.facts import ModelFacts
from kmec.planner.draft import Draft
from kmec.planner.model import Cost, Reason, StatsRequest, Step
from kmec.planner.passes.choose_backend import has_editor

CPU_FLOPS = 1.45e11
FWD_BWD = 3.0
PROMPT_TOKENS = 16  # a rendered prompt plus its target, typically
CONTEXTS = 11  # keys/values are averaged over ~10 context prefixes plus the bare prompt
VALUE_STEPS = 25  # v*/z optimisation steps (ROME 20, MEMIT 25 in the published hparams)
FT_STEPS = 40  # constrained fine-tuning steps, at most (FinetuneParams.steps; early stop)
MEMORY_STEPS = 20  # codebook value steps: at most 50, early stop after ~18 measured (lr 1.0)
MEMORY_CONTEXTS = 5  # the bare prompt and 4 seeded prefixes (MemoryParams.n_prefixes)
MEMORY_BATCH_TOKENS = 2048  # padded tokens per value-training batch (MemoryParams.max_tokens)
EMBEDDER_PARAMS = 22_700_000  # all-MiniLM-L6-v2
MEND_TRAIN_STEPS = 10_000  # editor training, once per model (then cached)
MEND_BATCH = 10
STATS_BATCH = 16  # sequences per forward in the statistics pass
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


def _params_through(facts: ModelFacts, layer: int) -> float:
    """Parameters a forward pass touches when it stops after ``layer``."""
    total = model_params(facts)
    embed = facts.vocab_size * facts.d_model
    per_layer = max(total - embed, 0) / facts.n_layers
    return embed + per_layer * (layer + 1)


def _seconds(token_forwards: float, params: float) -> float:
    return token_forwards * 2 * params / CPU_FLOPS


def _activations_mb(facts: ModelFacts, tokens: float) -> float:
    return tokens * facts.n_layers * (4 * facts.d_model + 2 * facts.d_mlp) * 4 / MB


def _work(step: Step, facts: ModelFacts, first_mend: bool) -> tuple[float, float, list[str]]:
    """Seconds and extra MB of the step's own work (statistics excluded)."""
    p, n, L = model_params(facts), len(step.edits), max(len(step.layers), 1)
    prompts = sum(1 + len(e.scope) for e in step.edits)
    d, m = facts.d_model, facts.d_mlp
    if step.backend in ("rome", "memit", "alphaedit"):
        value = _seconds(n * VALUE_STEPS * CONTEXTS * PROMPT_TOKENS * FWD_BWD, p)
        keys = _seconds(n * L * CONTEXTS * PROMPT_TOKENS, p)
        solve = L * m**3 * (1 if step.backend == "rome" else 2) / CPU_FLOPS
        extra = (_activations_mb(facts, CONTEXTS * PROMPT_TOKENS)
                 + L * (m * m + m * n + d * n) * 4 / MB)
        return value + keys + solve, extra, [
            f"value optimisation {value:.0f} s", f"keys {keys:.0f} s", f"solve {solve:.1f} s"]
    if step.backend == "ft":
        anchors = sum(len(e.preserve) for e in step.edits) or 5 * n
        secs = _seconds(FT_STEPS * (prompts * FWD_BWD + 2 * anchors) * PROMPT_TOKENS, p)
        trained = L * d * m
        extra = _activations_mb(facts, prompts * PROMPT_TOKENS) + trained * 4 * 3 / MB
        return secs, extra, [f"at most {FT_STEPS} steps over {prompts} prompts and {anchors} "
                             f"KL anchors {secs:.0f} s"]
    if step.backend == "memory":
        secs = _seconds(MEMORY_STEPS * prompts * MEMORY_CONTEXTS * PROMPT_TOKENS * FWD_BWD, p)
        batch = min(MEMORY_BATCH_TOKENS, prompts * MEMORY_CONTEXTS * PROMPT_TOKENS)
        return secs, _activations_mb(facts, batch), [
            f"codebook training {secs:.0f} s"]
    if step.backend == "retrieval":
        texts = 2 * (prompts + sum(len(e.preserve) for e in step.edits))
        secs = _seconds(texts * PROMPT_TOKENS, EMBEDDER_PARAMS)
        return secs, EMBEDDER_PARAMS * 4 / MB, [f"embedding {texts} texts {secs:.1f} s"]
    if step.backend == "mend":
        secs = _seconds(prompts * PROMPT_TOKENS * FWD_BWD, p)
        parts = [f"editing {secs:.0f} s"]
        if first_mend:
            train = _seconds(MEND_TRAIN_STEPS * MEND_BATCH * PROMPT_TOKENS * FWD_BWD, p)
            secs += train
            parts.append(f"editor training {train:.0f} s (once per model)")
        hyper = L * 2 * (d + m) * (d + m) * 4 / MB
        return secs, _activations_mb(facts, MEND_BATCH * PROMPT_TOKENS) + hyper, parts
    return 0.0, 0.0, ["no cost model for this backend"]


def _stats(request: StatsRequest, step: Step, facts: ModelFacts) -> tuple[float, float]:
    secs = _seconds(request.tokens, _params_through(facts, max(request.layers)))
    if step.backend == "alphaedit":
        secs += len(request.layers) * 10 * facts.d_mlp**3 / CPU_FLOPS
    mb = len(request.layers) * facts.d_mlp**2 * BYTES.get(request.dtype, 4) / MB
    # forward only: one block's activations for one batch are alive at a time
    batch = STATS_BATCH * request.max_len * (4 * facts.d_model + 2 * facts.d_mlp) * 4 / MB
    return secs, mb + batch


def estimate_cost(draft: Draft, facts: ModelFacts) -> Draft:
    """Set ``cost`` on every step (statistics are charged to the first step that needs them).

    >>> from kmec.planner.draft import example_facts, example_spec
    >>> from kmec.planner.passes.group_edits import group_edits
    >>> from kmec.planner.passes.resolve import resolve
    >>> d = resolve(Draft(spec=example_spec()), example_facts()).update(backend="memory")
    >>> d = estimate_cost(group_edits(d, example_facts()), example_facts())
    >>> d.steps[0].cost.seconds > 0, d.steps[0].cost.peak_mb > 500
    (True, True)
    """
    weights_mb = model_params(facts) * BYTES.get(facts.dtype, 4) / MB
    seen: set[StatsRequest] = set()
    mend_trained = has_editor(draft, facts)
    for i, step in enumerate(draft.steps):
        secs, extra, parts = _work(step, facts, first_mend=not mend_trained)
        if step.backend == "mend":
            mend_trained = True
        req = step.needs_stats
        if req is not None and req not in seen:
            seen.add(req)
            s_secs, s_mb = _stats(req, step, facts)
            secs += s_secs
            extra = max(extra, s_mb)
            parts.insert(0, f"statistics {s_secs:.0f} s (first use)")
        cost = Cost(seconds=round(secs, 1), peak_mb=round(weights_mb + extra, 1))
        because = (f"rough CPU estimate: {'; '.join(parts)}; peak = weights "
                   f"{weights_mb:.0f} MB + {extra:.0f} MB working memory")
        reason = Reason(choice=f"~{cost.seconds:g} s, ~{cost.peak_mb:g} MB", because=because)
        draft = draft.replace_step(i, step.model_copy(
            update={"cost": cost, "reasons": (*step.reasons, reason)}))
    return draft
