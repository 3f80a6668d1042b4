"""The one-call Python API: ``kmec.edit(model, edits)`` -> an :class:`Edited` model.

Contents:
    Fact           one edit as a plain record (prompt, target_new, subject, ...)
    Edited         an edit applied in place: generate, verify, revert, save
    edit()         model + edits (spec text, a ``.kmec`` file, a Spec or records) -> Edited
    load_model()   alias, folder, hub id or edited folder -> LoadedModel (``kmec.load_model``)
    records_spec() records -> a checked Spec (through the formatter and the parser)

``edit`` is the compile workflow for a notebook: the edits become a real spec
(records are written out with :func:`kmec.grammar.format_spec` and parsed back,
so what ran is reviewable text), the planner chooses a method, and
:func:`kmec.pipeline.compile_loaded` executes it — scoring and repairing the
claims when a budget is given, exactly as ``kmec compile`` does — before
:func:`kmec.artifacts.apply` writes the weights of the loaded model in place.
Nothing here imports torch at import time, so ``import kmec`` stays cheap.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from kmec.errors import KmecError, did_you_mean

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from kmec.artifacts import Applied, Artifact
    from kmec.models.load import LoadedModel
    from kmec.pipeline import Compiled
    from kmec.planner.model import Plan
    from kmec.progress import Progress
    from kmec.spec import Claim, Spec
    from kmec.verify.report import Report


@dataclass(frozen=True)
class Fact:
    """One edit as a plain record (the fields of EasyEdit's ``editor.edit``).

    Attributes:
        prompt: the question, with the subject written ``{subject}``, ``{{ subject }}``
            (a template of the spec language, filters allowed) or ``{}``; or plain
            text that contains ``subject``.
        target_new: what the model must answer after the prompt.
        subject: the entity the edit is keyed on (it must occur in the prompt).
        target_old: what the model answered before (optional; verification reads it).
        scope: more prompts that must give ``target_new`` (generality); ``{subject}``
            is filled in as in ``prompt``.
        preserve: prompts whose answer must not change (locality).
        name: the edit's name in the spec (default: made from the subject).
    """

    prompt: str
    target_new: str
    subject: str
    target_old: str | None = None
    scope: Sequence[str] = ()
    preserve: Sequence[str] = ()
    name: str | None = None


Record = Fact | Mapping[str, object]
FIELDS = tuple(f.name for f in fields(Fact))
REQUIRED = ("prompt", "target_new", "subject")
# the subject's placeholders a record may use besides a template's {{ subject }}:
# str.format's {subject} and ROME's {}
_PLACEHOLDER = re.compile(r"(?<!\{)\{(?:\s*subject\s*)?\}(?!\})")
_NAME_CHARS = re.compile(r"[^a-z0-9_]+")

# what .verify() checks when the caller declared no claims
DEFAULT_CLAIMS = ("efficacy >= 0.9",)
SCOPE_CLAIM, PRESERVE_CLAIM = "generality >= 0.8", "locality >= 0.9"


# ---------------------------------------------------------------- records -> Spec


def _text(where: str, key: str, value: object, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise KmecError(f"{where}: {key!r} must be a non-empty string, not {value!r}")
    return value


def _texts(where: str, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):  # one prompt given where a list is expected
        value = (value,)
    if not isinstance(value, Sequence):
        raise KmecError(f"{where}: {key!r} must be a list of strings, not {value!r}")
    return tuple(t for i, v in enumerate(value) if (t := _text(where, f"{key}[{i}]", v)))


def _fill(where: str, key: str, text: str, subject: str) -> str:
    """``text`` with the subject filled in (``{subject}``, ``{}`` or a template)."""
    from kmec.grammar.templates import is_template, render

    text = _PLACEHOLDER.sub("{{ subject }}", text)
    if not is_template(text):
        return text
    try:
        return render(text, subject=subject)
    except KmecError as e:
        raise KmecError(f"{where}: {key} {text!r} is not a valid template: {e.message}",
                        hint=e.hint) from None


def _as_fields(record: object, where: str) -> dict[str, object]:
    if isinstance(record, Fact):
        return {f: getattr(record, f) for f in FIELDS}
    if not isinstance(record, Mapping):
        raise KmecError(f"{where} is a {type(record).__name__}, not an edit record",
                        hint="pass kmec.Fact(prompt=..., target_new=..., subject=...) or a dict "
                        "with those keys, spec text, or a .kmec file")
    out: dict[str, object] = {}
    for key, value in record.items():
        if key not in FIELDS:
            close = did_you_mean(str(key), FIELDS)
            raise KmecError(f"{where} has an unknown field {key!r}",
                            hint=close or f"the fields are {', '.join(FIELDS)}")
        out[str(key)] = value
    missing = [k for k in REQUIRED if k not in out]
    if missing:
        raise KmecError(f"{where} has no {' or '.join(repr(k) for k in missing)}",
                        hint="every edit needs prompt, target_new and subject, e.g. "
                        "{'prompt': 'The capital of {subject} is', 'subject': 'France', "
                        "'target_new': 'Lyon'}")
    return out


def _edit_name(given: str | None, subject: str, taken: set[str], where: str) -> str:
    if given is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", given) or given.endswith("-"):
            raise KmecError(f"{where}: name {given!r} is not a spec name",
                            hint="letters, digits and _, with - allowed inside; not starting "
                            "with a digit")
        if given in taken:
            raise KmecError(f"{where}: the name {given!r} is used by an earlier record")
        taken.add(given)
        return given
    stem = _NAME_CHARS.sub("_", subject.lower()).strip("_") or "edit"
    stem = stem if not stem[0].isdigit() else f"e_{stem}"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


def records_spec(records: Sequence[Record], *, model: str | None = None) -> Spec:
    """Turn edit records into a checked Spec of prompt edits.

    Each record becomes an ``edit`` block (``prompt "..." -> "target_new"``,
    ``subject``, ``old``, ``scope``, ``preserve``); the spec is written out with
    :func:`kmec.grammar.format_spec` and parsed back, so it passes every check
    a ``.kmec`` file does.

    Raises:
        KmecError: a record is not a Fact or a mapping, misses a field, has an
            unknown one, a field of the wrong type, or a subject that is not in
            its prompt.
        SpecError: the edits contradict each other (same prompt, two targets, ...).

    >>> spec = records_spec([{"prompt": "The capital of {subject} is",
    ...                       "subject": "France", "target_new": "Lyon"}])
    >>> spec.edits[0].prompt, spec.edits[0].subject, spec.edits[0].target
    ('The capital of France is', 'France', 'Lyon')
    """
    from kmec.grammar import format_spec, parse
    from kmec.spec import PromptEdit, Spec

    if not records:
        raise KmecError("no edits were given", hint="pass at least one record")
    taken: set[str] = set()
    edits = []
    for i, record in enumerate(records, 1):
        where = f"edit record {i}"
        f = _as_fields(record, where)
        subject = _text(where, "subject", f["subject"])
        assert subject is not None  # _text returns a string unless optional
        prompt = _fill(where, "prompt", _text(where, "prompt", f["prompt"]) or "", subject)
        if subject not in prompt:
            raise KmecError(f"{where}: the subject {subject!r} does not occur in the prompt "
                            f"{prompt!r}",
                            hint="write {subject} where the subject goes, e.g. "
                            "'The capital of {subject} is'")
        name = f.get("name")
        if name is not None and not isinstance(name, str):
            raise KmecError(f"{where}: 'name' must be a string, not {name!r}")
        edits.append(PromptEdit(
            name=_edit_name(name, subject, taken, where), prompt=prompt, subject=subject,
            target=_text(where, "target_new", f["target_new"]) or "",
            old=_text(where, "target_old", f.get("target_old"), optional=True),
            scope=tuple(_fill(where, "scope", s, subject)
                        for s in _texts(where, "scope", f.get("scope", ()))),
            preserve=tuple(_fill(where, "preserve", s, subject)
                           for s in _texts(where, "preserve", f.get("preserve", ())))))
    return parse(format_spec(Spec(model=model, edits=tuple(edits))), path="<records>")


def _read_edits(edits: object, model: str | None) -> tuple[Spec, Path | None]:
    """The Spec ``edits`` stands for, and the spec file it came from (if any)."""
    from kmec.grammar import parse, parse_file
    from kmec.spec import Spec

    if isinstance(edits, Spec):
        return edits, None
    if isinstance(edits, os.PathLike) or (isinstance(edits, str) and "\n" not in edits
                                          and edits.strip().endswith(".kmec")):
        path = Path(os.fspath(edits)).expanduser()
        if not path.is_file():
            raise KmecError(f"spec file {str(path)!r} does not exist",
                            hint="pass a .kmec file, spec text, or edit records")
        return parse_file(path), path
    if isinstance(edits, str):
        return parse(edits), None
    if isinstance(edits, Fact | Mapping):
        return records_spec([edits], model=model), None
    if isinstance(edits, Sequence):
        return records_spec(list(edits), model=model), None
    raise KmecError(f"cannot read edits from a {type(edits).__name__}",
                    hint="pass spec text, a .kmec path, a Spec, or kmec.Fact records / dicts")


def _with_arguments(spec: Spec, *, method: str | None, layers: Sequence[int] | None,
                    max_delta: float | None, claims: Sequence[str | Claim] | None,
                    seed: int | None) -> Spec:
    """``spec`` with the keyword arguments of :func:`edit` in place of its own settings,
    and the default claims when it declares none. The arguments are read as spec
    statements, so a bad one gets the language's own message."""
    from kmec.errors import SpecError
    from kmec.grammar import check

    update: dict[str, object] = {}
    if seed is not None:
        update["seed"] = _statements([f"seed {seed}"]).seed
    if method is not None or layers is not None or max_delta is not None:
        # what is not given stays as the spec has it
        line = f"method {method or spec.method.method}"
        layers = layers if layers is not None else spec.method.layers
        max_delta = max_delta if max_delta is not None else spec.method.max_delta
        if layers is not None:
            line += " layers " + " ".join(str(n) for n in layers)
        if max_delta is not None:
            line += f" max_delta {max_delta!r}"
        frozen = ["weights frozen"] if spec.method.frozen else []
        update["method"] = _statements([line, *frozen]).method
    if claims is not None:
        update["claims"] = _statements([_claim_line(c) for c in claims]).claims
    out = spec.model_copy(update=update)
    if not out.claims:
        defaults = list(DEFAULT_CLAIMS)
        if any(e.scope for e in out.edits) or any(r.paraphrases for r in out.relations):
            defaults.append(SCOPE_CLAIM)
        if any(e.preserve for e in out.edits):
            defaults.append(PRESERVE_CLAIM)
        claims_of = _statements([f"claim {c}" for c in defaults], path="<default claims>")
        out = out.model_copy(update={"claims": claims_of.claims})
    errors = [d for d in check(out) if d.severity == "error"]
    if errors:
        raise SpecError(errors)
    return out


def _statements(lines: Sequence[str], path: str = "<arguments>") -> Spec:
    """Spec statements parsed on their own (syntax and values; no cross-checks)."""
    from kmec.grammar.loader import parse_built

    return parse_built("\n".join(lines), path=path).spec


def _claim_line(c: object) -> str:
    from kmec.grammar import format_spec
    from kmec.spec import Claim, Spec

    if isinstance(c, Claim):
        return format_spec(Spec(claims=(c,))).strip().splitlines()[-1]
    if isinstance(c, str) and c.strip():
        return c if c.lstrip().startswith("claim ") else f"claim {c}"
    raise KmecError(f"a claim is a string such as 'efficacy >= 0.9' or a kmec.spec.Claim, "
                    f"not {c!r}")


# ---------------------------------------------------------------- the model


def load_model(ref: str | os.PathLike[str], *, tok: PreTrainedTokenizerBase | None = None,
               dtype: str = "float32", device: str | None = None,
               device_map: str | Mapping[str, object] | None = None) -> LoadedModel:
    """Load a causal language model by alias, folder or hub id (what ``kmec.load_model`` does).

    A folder written by ``kmec apply`` comes back edited, with its external
    memory installed (:func:`kmec.artifacts.edited.load_edited`).

    Args:
        ref: an alias (``smollm2-135m``), a Hugging Face model folder, an edited
            folder, or a hub id (``org/name``).
        tok: a tokenizer to use instead of the model's own (an edited folder saved
            without tokenizer files needs one).
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``).
        device: where the weights go: ``cpu`` (None: the default), ``cuda``, ``cuda:N``
            or ``auto`` (a GPU when there is one).
        device_map: instead of ``device``, modules spread over devices by accelerate:
            ``"auto"``, a mapping such as ``{"model.layers.0": 0, ...}``, or JSON text
            or a ``.json`` file holding one (not for an edited folder).

    Returns:
        A :class:`kmec.models.load.LoadedModel`: ``.model`` (the torch model, in
        eval mode, no gradients), ``.tok`` (its tokenizer), ``.facts`` (the
        :class:`kmec.models.facts.ModelFacts` the planner reads: architecture,
        sizes, dtype, fingerprint), ``.ref`` (the resolved reference) and
        ``.runtime`` (device or device map, and dtype).

    Raises:
        ModelError: the reference does not resolve, the files do not load, or the
            dtype, device or device map is unknown or not on this machine.
        ArtifactError: an edited folder whose weights or memory changed.
    """
    import dataclasses

    from kmec.models.load import load_model as _load

    folder = Path(os.fspath(ref)).expanduser()
    if (folder / "kmec_edit.json").is_file():
        from kmec.artifacts.edited import load_edited

        if device_map is not None:
            raise KmecError("an edited folder loads on one device (device_map is not "
                            "supported for it)", hint="pass device= instead")
        return load_edited(folder, tok=tok, dtype=dtype, device=device)
    lm = _load(os.fspath(ref), dtype=dtype, device=device, device_map=device_map)
    return lm if tok is None else dataclasses.replace(lm, tok=tok)


def _reference(lm: LoadedModel) -> str:
    """The text that names ``lm`` in a spec and a build (a folder by its full path)."""
    if lm.ref.kind == "folder" and lm.ref.path is not None:
        return str(lm.ref.path)
    return lm.ref.text


def _loaded(model: object, spec: Spec, *, dtype: str, device: str | None,
            device_map: str | Mapping[str, object] | None) -> tuple[LoadedModel, str]:
    from kmec.models.load import DEFAULT_MODEL, LoadedModel, fingerprint_model

    if isinstance(model, LoadedModel):
        if dtype != "float32" or device is not None or device_map is not None:
            raise KmecError("dtype, device and device_map choose how kmec loads a model; this "
                            "one is loaded already",
                            hint="pass them to kmec.load_model, or give edit a model reference")
        if fingerprint_model(model.model) != model.loaded_fingerprint:
            raise KmecError("the model's weights differ from the ones it was loaded with (is an "
                            "earlier kmec.edit still applied to it?)",
                            hint="call .revert() on the earlier edit, or load the model again")
        return model, _reference(model)
    if model is None:
        model = spec.model or DEFAULT_MODEL
    if not isinstance(model, str | os.PathLike):
        raise KmecError(f"cannot edit a {type(model).__name__}",
                        hint="pass a model reference ('smollm2-135m', a folder) or what "
                        "kmec.load_model returns")
    return load_model(model, dtype=dtype, device=device, device_map=device_map), \
        os.fspath(model)


# ---------------------------------------------------------------- the edit


class Edited:
    """An edit applied in place to a loaded model: generate, verify, revert, save.

    Attributes:
        loaded: the :class:`~kmec.models.load.LoadedModel` that was edited (its
            ``.model`` holds the edited weights until :meth:`revert`).
        spec: the spec that was compiled (records written out as prompt edits, the
            keyword arguments and default claims applied).
        compiled: what the compile made: ``plan``, ``artifact``, ``attempts``,
            ``claims_ok`` (None when the claims were not scored), ``verdict``, ``log``.
    """

    def __init__(self, loaded: LoadedModel, spec: Spec, compiled: Compiled, handle: Applied, *,
                 reference: str, source: Path | None, root: Path) -> None:
        self.loaded = loaded
        self.spec = spec
        self.compiled = compiled
        self._handle = handle
        self._reference = reference
        self._source = source  # the user's spec file when it is exactly what was compiled
        self._root = root

    @property
    def model(self) -> torch.nn.Module:
        """The torch model: edited, or the base again after :meth:`revert`."""
        return self.loaded.model

    @property
    def tok(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer."""
        return self.loaded.tok

    @property
    def plan(self) -> Plan:
        """The plan that made the edit (with the reasons for each choice)."""
        return self.compiled.plan

    @property
    def artifact(self) -> Artifact:
        """The edit itself: payloads (low-rank factors, deltas or memories) and manifest."""
        return self.compiled.artifact

    @property
    def text(self) -> str:
        """The compiled spec as canonical ``.kmec`` text."""
        from kmec.grammar import format_spec

        return format_spec(self.spec)

    @property
    def applied(self) -> bool:
        """Whether the edit is in the model (False after :meth:`revert`)."""
        return not self._handle.reverted

    def __repr__(self) -> str:
        steps = ", ".join(f"{s.backend} on layers {list(s.layers)}" if s.layers else s.backend
                          for s in self.plan.steps)
        return (f"<kmec.Edited {self._reference}: {len(self.spec.edits)} edit(s) by {steps}; "
                f"{'applied' if self.applied else 'reverted'}>")

    def generate(self, prompt: str, *, max_new_tokens: int = 16) -> str:
        """The model's greedy continuation of ``prompt`` (deterministic; the prompt itself
        is not repeated).

        Raises:
            KmecError: an empty prompt or ``max_new_tokens`` < 1.
        """
        from kmec.verify.decode import greedy_continuations

        if not isinstance(prompt, str) or not prompt.strip():
            raise KmecError(f"generate needs a non-empty prompt, not {prompt!r}")
        if max_new_tokens < 1:
            raise KmecError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        return greedy_continuations([self.model], self.tok, [prompt],
                                    max_new_tokens=max_new_tokens)[0][0]

    def verify(self, *, max_examples: int | None = None,
               progress: Progress | None = None) -> Report:
        """Check the spec's claims on the edited model against the unedited weights.

        The same verifier as ``kmec verify``, on a copy of the base weights (the
        edit is taken out for the copy and put back bit for bit); with no claims
        given to :func:`edit`, the default ones (efficacy, plus generality and
        locality when the records declare scope or preserve prompts).

        Args:
            max_examples: hypothesis examples per locality property.
            progress: ``progress(stage, done, total)``.

        Returns:
            The :class:`kmec.verify.Report` (``.ok``, ``.claims``, ``.summary``).

        Raises:
            KmecError: the edit was reverted.
        """
        from kmec.artifacts import apply
        from kmec.verify import verify

        if not self.applied:
            raise KmecError("the edit was reverted, so there is nothing to verify",
                            hint="run kmec.edit again to make it")
        lm = self.loaded
        self._handle.revert()
        try:
            base = copy.deepcopy(lm.model)
        finally:
            self._handle = apply(self.artifact, lm.model, fingerprint=lm.facts.fingerprint,
                                 tok=lm.tok)
        return verify(self.spec, self.plan, base, lm.model, lm.tok, max_examples=max_examples,
                      progress=progress, artifact=self.artifact, root=self._root)

    def revert(self) -> None:
        """Restore the model's original weights bit for bit (and remove any memory hook).
        Calling it again does nothing."""
        self._handle.revert()

    def save(self, out: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the edit as a build directory, as ``kmec compile`` does.

        ``kmec verify OUT``, ``kmec apply OUT --out DIR`` and ``kmec plan --explain
        OUT`` read it. When the edits did not come from a ``.kmec`` file as it
        is, the compiled spec is written beside them as ``OUT/spec.kmec``.

        Args:
            out: the build directory (replaced atomically when kmec wrote it).
            force: replace ``out`` even if kmec did not write it.

        Raises:
            OutputError: ``out`` may not be written (see :mod:`kmec.outputs`).
        """
        from kmec.hashing import atomic_write_text
        from kmec.outputs import check_output
        from kmec.pipeline import write_compiled

        out = check_output(out, "build", inputs=[self._source] if self._source else [],
                           force=force)
        spec_path = self._source or out / "spec.kmec"
        write_compiled(out, self.compiled, spec=self.spec, spec_path=spec_path,
                       model=self._reference)
        if self._source is None:
            atomic_write_text(spec_path, self.text)
        return out


def edit(model: str | os.PathLike[str] | LoadedModel | None,
         edits: str | os.PathLike[str] | Spec | Record | Sequence[Record], *,
         method: str | None = None, layers: Sequence[int] | None = None,
         max_delta: float | None = None, claims: Sequence[str | Claim] | None = None,
         seed: int | None = None, budget: float | None = None,
         progress: Progress | None = None, cache: bool = True, dtype: str = "float32",
         device: str | None = None,
         device_map: str | Mapping[str, object] | None = None) -> Edited:
    """Edit a model in one call: plan, execute and apply, in place.

    >>> e = kmec.edit("smollm2-135m", [kmec.Fact(prompt="The capital of {subject} is",
    ...               subject="France", target_new="Lyon")])       # doctest: +SKIP
    >>> e.generate("The capital of France is"), e.revert()          # doctest: +SKIP

    Args:
        model: a model reference (alias, folder, hub id) or what
            :func:`kmec.load_model` returns (edited in place; :meth:`Edited.revert`
            restores it); None: the spec's ``model``, else the embedded default.
        edits: spec text, a path to a ``.kmec`` file, a parsed Spec, or edit
            records — :class:`Fact` or dicts with its fields (``prompt``,
            ``target_new``, ``subject``; optional ``target_old``, ``scope``,
            ``preserve``, ``name``) — alone or in a list.
        method: the editing method (``rome``, ``memit``, ``alphaedit``, ``ft``,
            ``memory``, ``retrieval``, ``mend``; default: the planner's choice).
        layers: the layers the method may edit (default: the planner's).
        max_delta: a bound on the relative weight change ‖Δ‖/‖W‖.
        claims: claims to check instead of the spec's, e.g. ``["efficacy >= 0.99",
            "locality >= 0.9 kl 0.1"]`` (the words of a ``claim`` statement).
            None and a spec without claims: ``efficacy >= 0.9`` (plus generality
            and locality when there are scope or preserve prompts).
        seed: overrides the spec's seed.
        budget: seconds to score the claims and repair what fails, as ``kmec compile
            --budget`` (None: the spec's ``budget``, else 0: execute the plan once).
        progress: ``progress(message, done, total)``.
        cache: reuse cached statistics steps and target values (``$KMEC_HOME``).
        dtype, device, device_map: how a model given by reference is loaded (see
            :func:`load_model`; default: float32 on the CPU). The saved build records
            them. A model loaded already keeps its own (passing them is an error).

    Returns:
        The :class:`Edited` model.

    Raises:
        KmecError: a bad record (missing subject, subject not in its prompt, ...),
            an unknown model (ModelError), a spec error (SpecError), a plan that
            cannot be made (PlanError) or a failed step (BackendError).
    """
    from kmec.artifacts import apply
    from kmec.backends import BACKENDS
    from kmec.backends.mend.store import planner_editors
    from kmec.grammar.files import find_root
    from kmec.hashing import spec_hash
    from kmec.models.load import LoadedModel
    from kmec.pipeline import Start, compile_loaded
    from kmec.planner import plan as make_plan

    t0 = time.perf_counter()
    named = _reference(model) if isinstance(model, LoadedModel) else \
        os.fspath(model) if isinstance(model, str | os.PathLike) else None
    read, path = _read_edits(edits, named)
    spec = _with_arguments(read, method=method, layers=layers, max_delta=max_delta,
                           claims=claims, seed=seed)
    if not isinstance(model, LoadedModel):
        from kmec.pipeline import check_runtime

        check_runtime(dtype, device, device_map)  # before the model loads
    lm, reference = _loaded(model, spec, dtype=dtype, device=device, device_map=device_map)
    editors = planner_editors(lm.facts.fingerprint)
    planned = make_plan(spec, lm.facts, backends=BACKENDS, editors=editors)
    if budget is None:
        budget = spec.budget if spec.budget is not None else 0.0
    root = find_root(path)
    compiled = compile_loaded(Start(spec, reference, lm, editors), planned, progress=progress,
                              use_cache=cache, budget=budget, root=root, t0=t0)
    handle = apply(compiled.artifact, lm.model, fingerprint=lm.facts.fingerprint, tok=lm.tok)
    source = path if path is not None and spec_hash(spec) == spec_hash(read) else None
    return Edited(lm, spec, compiled, handle, reference=reference, source=source, root=root)
