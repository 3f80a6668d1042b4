"""Execution: run a plan's steps on a model and return the artifact (with a step cache).

Contents:
    execute()        Plan + model -> Artifact (each step wrapped in BackendError)
    stats_for_step() the statistics provider a step asks for (or None)
    chat_step()      a step with its prompts wrapped in the model's chat template

Steps are cached by content (``$KMEC_HOME/steps/<hash>``: the step, the base
fingerprint, the plan's seed, the kmec version and, for ``order sequence``, the
steps before it; for a step that draws wordings from the model, the revision of how
they are drawn), so rerunning an unchanged spec in CI recompiles nothing; a cached step is
used only if its artifact is intact and its payloads are what the step
declares. Inside a step that must run, the rank-one backends reuse the target
values (δ) of edit chunks optimised before on the same weights
(``$KMEC_HOME/backends/values``, :class:`kmec.backends.values.ValueCache`):
changing λ or the layer range, or adding edits to a spec, re-optimises only
what changed. ``use_cache=False`` turns off both.

A plan made from a spec with ``chat on`` (``plan.chat``) has its steps' prompts
wrapped in the model's chat template (:mod:`kmec.models.chat`) before anything
else sees them: the step cache key, the backends' keys and target values, the
memories' codebooks all see the prompts as the model will be asked them.

The workflow around it (parse, plan, write the build directory, verify) is
:mod:`kmec.pipeline`; the build directory's format is
:mod:`kmec.artifacts.build`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from kmec._version import __version__
from kmec.artifacts import Artifact, apply, build_artifact, load_artifact, save_artifact
from kmec.artifacts.payloads import Payload
from kmec.backends import get_backend, wordings
from kmec.backends.base import ExecContext, StatsProvider
from kmec.errors import ArtifactError, BackendError, KmecError, ModelError
from kmec.hashing import canonical_json, sha256_text
from kmec.models.adapters import adapter_for
from kmec.models.chat import ChatFrame, chat_frame
from kmec.models.load import LoadedModel, kmec_home
from kmec.planner.model import EditRequest, Plan, Step
from kmec.progress import Progress

log = logging.getLogger("kmec")


def _step_key(step: Step, fingerprint: str, previous: str, seed: int,
              runtime: dict[str, Any] | None = None) -> str:
    # the plan's seed reaches the backend (context prefixes, initialisations): a step
    # compiled under another seed is another result; so is one computed on another device or
    # in another dtype (δ differs). The default runtime (CPU, float32) is left out of the key
    # so the steps cached before runtimes existed stay valid.
    key = {"step": step.model_dump(mode="json"), "base": fingerprint, "kmec": __version__,
           "previous": previous, "seed": seed}
    if runtime is not None:
        key["runtime"] = runtime
    # a step that draws wordings from the model (kmec.backends.wordings) depends on how
    # they are drawn and kept, which can change within a kmec version: a change of that
    # rule (wordings.VERSION) must not hand back a step computed under the old one.
    # Steps that draw none keep their keys.
    if wordings.per_edit(step.params):
        key["wordings"] = wordings.VERSION
    return sha256_text(canonical_json(key))


def stats_for_step(step: Step, lm: LoadedModel, progress: Progress | None = None
                   ) -> StatsProvider | None:
    """The statistics provider ``step`` asks for (None: it needs none)."""
    if step.needs_stats is None:
        return None
    from kmec.stats import provider

    return provider(lm.model, lm.tok, lm.facts, adapter_for(lm.facts.model_type),
                    step.needs_stats, progress=progress)


def chat_step(step: Step, frame: ChatFrame) -> Step:
    """``step`` with every prompt asked as a user turn of ``frame``'s chat template.

    The edit, scope and preserve prompts and the step's declared locality set are
    wrapped; targets are not (they are the assistant's answer). Subjects stay as
    written: they are found inside the wrapped prompt.

    Raises:
        ModelError: an edit's subject also occurs in the template's text before the
            user's message (a system message), where its key would be read.
    """
    for e in step.edits:
        if e.subject and e.subject in frame.head:
            raise ModelError(
                f"edit {e.name!r}: its subject {e.subject!r} also occurs in the chat template's "
                "text before the prompt (its system message), where the edit would be keyed",
                hint='give the spec a system message that does not name it: '
                     'chat on system "You are a helpful assistant."')

    def wrap(e: EditRequest) -> EditRequest:
        return e.model_copy(update={"prompt": frame.wrap(e.prompt),
                                    "scope": tuple(map(frame.wrap, e.scope)),
                                    "preserve": tuple(map(frame.wrap, e.preserve))})

    return step.model_copy(update={"edits": tuple(wrap(e) for e in step.edits),
                                   "protect": tuple(map(frame.wrap, step.protect))})


def execute(plan: Plan, lm: LoadedModel, *, progress: Progress | None = None,
            use_cache: bool = True, values_dir: Path | None = None) -> Artifact:
    """Run every step of ``plan`` on ``lm`` and return the artifact.

    The model is left exactly as it was (checked with its fingerprint). For
    ``order sequence`` each step sees the earlier steps' edits applied.
    ``values_dir``: with ``use_cache=False``, the backends' cache folder for this
    call's caller only (the repair loop of one compile reuses its own target
    values without reading or writing ``$KMEC_HOME``).

    Raises:
        BackendError: a step failed (wrapping the cause) or mutated the model.
        ModelError: the plan says ``chat on`` and the model has no chat template.
    """
    adapter = adapter_for(lm.facts.model_type)
    frame = None if plan.chat is None else chat_frame(lm.tok, system=plan.chat.system,
                                                      model=plan.model)
    cache_root = kmec_home() / "steps"
    results: list[tuple[str, list[Payload]]] = []
    applied = []
    previous = ""
    try:
        for step in plan.steps:
            if frame is not None:
                step = chat_step(step, frame)
            history = previous if plan.order == "sequence" else ""
            runtime = getattr(lm, "runtime", None)  # test doubles may lack it: the default
            key = _step_key(step, lm.facts.fingerprint, history, plan.seed,
                            None if runtime is None or runtime.is_default else runtime.to_json())
            previous = key
            payloads = _cached_step(cache_root / key, step) if use_cache else None
            if payloads is None:
                # the weights this step runs on: the base, or the base plus earlier steps
                weights = sha256_text(f"{lm.facts.fingerprint}+{history}") if history \
                    else lm.facts.fingerprint
                payloads = _run_step(step, lm, adapter, plan.seed, progress,
                                     weights=weights, use_cache=use_cache, values_dir=values_dir)
                if use_cache:
                    _store_step(cache_root / key, step, payloads, lm, adapter, plan)
            else:
                log.info("step %s: unchanged, reusing cached result", step.id)
            results.append((step.id, payloads))
            if plan.order == "sequence":
                one = build_artifact([(step.id, payloads)], base_model=plan.model,
                                     base_fingerprint=lm.facts.fingerprint,
                                     base_arch=lm.facts.arch,
                                     weight_layout=adapter.weight_layout, plan_hash=plan.sha256)
                applied.append(apply(one, lm.model, check=False, tok=lm.tok))
    finally:
        for a in reversed(applied):
            a.revert()
    return build_artifact(results, base_model=plan.model, base_fingerprint=lm.facts.fingerprint,
                          base_arch=lm.facts.arch, weight_layout=adapter.weight_layout,
                          plan_hash=plan.sha256)


def _run_step(step: Step, lm: LoadedModel, adapter: Any, seed: int,
              progress: Progress | None, *, weights: str, use_cache: bool,
              values_dir: Path | None = None) -> list[Payload]:
    backend = get_backend(step.backend)
    t0 = time.perf_counter()
    try:
        stats = stats_for_step(step, lm, progress)
        ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter, facts=lm.facts, stats=stats,
                          cache_dir=kmec_home() / "backends" if use_cache else values_dir,
                          weights=weights, seed=seed, progress=progress)
        payloads = list(backend.execute(step, ctx))
    except KmecError as e:
        if isinstance(e, BackendError):
            raise
        raise BackendError(str(e), step_id=step.id) from e
    except (RuntimeError, ValueError, FloatingPointError) as e:
        raise BackendError(f"{step.backend} failed: {e}", step_id=step.id,
                           hint="rerun with --debug for the traceback") from e
    log.info("step %s (%s, %d edits) took %.1f s", step.id, step.backend, len(step.edits),
             time.perf_counter() - t0)
    return payloads


def _cached_step(path: Path, step: Step) -> list[Payload] | None:
    if not (path / "manifest.json").exists():
        return None
    try:
        art = load_artifact(path)
    except ArtifactError as e:
        log.warning("ignoring a corrupt cached step at %s (%s)", path, e.message)
        return None
    for e in art.manifest.payloads:
        if e.step != step.id or (e.kind != "memory" and e.param not in step.writes):
            log.warning("ignoring a cached step at %s: payload %s is not what step %s declares",
                        path, e.id, step.id)
            return None
    return art.payloads()


def _store_step(path: Path, step: Step, payloads: list[Payload], lm: LoadedModel, adapter: Any,
                plan: Plan) -> None:
    art = build_artifact([(step.id, payloads)], base_model=plan.model,
                         base_fingerprint=lm.facts.fingerprint, base_arch=lm.facts.arch,
                         weight_layout=adapter.weight_layout, plan_hash="step")
    save_artifact(art, path)


