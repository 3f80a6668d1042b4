"""Property-based locality: hypothesis strategies for out-of-scope prompts.

Contents:
    Draw              one drawn prompt and where it came from
    NeighbourSpace    everything a neighbourhood may be drawn from, for one edit
    neighbour_space() build the space for an edit and a locality claim
    neighbourhood()   the hypothesis strategy over a space
    sample()          draw n prompts (generation only; no database)
    draw_from()       the same for any strategy of draws (held-out variants)
    replay()          the prompts stored in the example database for this property
    minimal_failure() hypothesis search + shrinking for the simplest violating prompt

A neighbourhood prompt is one of (in this order, which is also the order the
shrinker prefers):

* ``neighbour``: another subject of the relation, in one of its templates
  ("The capital of Spain is" for an edit of France's capital);
* ``subject``: the edited subject under another relation ("The currency of
  France is");
* ``question``: a general-knowledge question (:mod:`kmec.verify.canaries`);
* ``corpus``: the first k words of a sentence of the held-out text slice;
* ``neighbour+context`` (held-out locality only, ``context=True``): a
  neighbour prompt after the first k words of such a sentence — the compiler
  is shown neighbour prompts bare, never in this context.

Each is drawn as indices (template, subject, sentence, k), so a failure
shrinks to the first template, the first subject and the shortest prefix
that still fails. Prompts some edit declares in scope are filtered out.

Determinism. Runs use ``@seed`` derived from the spec's seed, so CI sees the
same sample every time. Failing examples are saved to the build directory's
example database and replayed first on the next run. Hypothesis (>= 6.131)
also mixes integer literals found in "local" source files into its draws,
which would make the sample depend on which modules happen to be imported;
:func:`_fixed_constants` switches that off for the duration of a run.
"""

from __future__ import annotations

import contextlib
import unittest
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import ExampleDatabase, ReadOnlyDatabase
from hypothesis.errors import HypothesisException
from pydantic import BaseModel, ConfigDict, Field

from kmec.errors import VerifyError
from kmec.grammar import subjects_of
from kmec.grammar.templates import inspect as inspect_template
from kmec.grammar.templates import render
from kmec.hashing import canonical_json, sha256_text
from kmec.spec import Claim, Spec
from kmec.verify import canaries
from kmec.verify.claims import Case

MIN_PREFIX_WORDS = 3


@dataclass(frozen=True)
class Draw:
    """A drawn prompt and its source (neighbour, subject, question, corpus)."""

    source: str
    prompt: str


class NeighbourSpace(BaseModel):
    """The out-of-scope prompts an edit's neighbourhood is drawn from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    templates: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    subject_prompts: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()
    sentences: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()
    # held-out locality: neighbour prompts also drawn after a sentence of the text slice
    context: bool = Field(default=False, exclude_if=lambda v: not v)

    @property
    def digest(self) -> str:
        """Content hash (keys the example database: a changed space starts afresh)."""
        d = self.model_dump(mode="json")
        d["exclude"] = sorted(self.exclude)
        return sha256_text(canonical_json(d))

    @property
    def empty(self) -> bool:
        return not ((self.templates and self.subjects) or self.subject_prompts
                    or self.questions or self.sentences)


def _forward_only(templates: Sequence[str]) -> tuple[str, ...]:
    return tuple(t for t in templates if "object" not in inspect_template(t).variables)


def neighbour_space(spec: Spec, case: Case, claim: Claim, cases: Sequence[Case],
                    excluded: frozenset[str], *, root: str | Path | None = None,
                    context: bool = False) -> NeighbourSpace:
    """The neighbourhood of ``case`` for a locality ``claim``.

    The relation is ``claim.neighbours_of`` or the edit's own; its subjects
    are the inline ones and those of its ``subjects from`` file (read relative
    to ``spec.source``, confined to ``root``). Subjects edited under that relation (by any edit of
    the spec) are left out: they are meant to change.

    Raises:
        VerifyError: the claim names a relation the spec lacks.
        SpecError: the subjects file cannot be read.
    """
    rel_name = claim.neighbours_of or case.relation
    rel = spec.relation(rel_name) if rel_name else None
    if rel_name and rel is None:
        raise VerifyError(f"locality claim names relation {rel_name!r}, which the spec "
                          "does not declare")
    templates: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()
    if rel is not None:
        templates = _forward_only((rel.prompt, *rel.paraphrases))
        listed = subjects_of(spec, rel, root=root)
        edited = {c.subject for c in cases if c.relation == rel.name}
        subjects = tuple(s for s in dict.fromkeys(listed) if s not in edited and s != case.subject)
    subject_prompts: tuple[str, ...] = ()
    if case.subject:
        edited_pairs = {(c.subject, c.relation) for c in cases}
        subject_prompts = tuple(
            render(r.prompt, subject=case.subject) for r in spec.relations
            if r.name != case.relation and (case.subject, r.name) not in edited_pairs
            and "object" not in inspect_template(r.prompt).variables)
    return NeighbourSpace(templates=templates, subjects=subjects, subject_prompts=subject_prompts,
                          questions=canaries.GENERAL_QUESTIONS, sentences=canaries.sentences(),
                          exclude=excluded, context=context)


def _neighbour(template: str, subject: str) -> Draw:
    return Draw("neighbour", render(template, subject=subject))


def context_prefix(sentences: tuple[str, ...]) -> st.SearchStrategy[str]:
    """The first k words (k >= MIN_PREFIX_WORDS, or the whole sentence) of one of
    ``sentences``; shrinks to the first sentence and the shortest prefix."""
    @st.composite
    def prefix(draw: st.DrawFn) -> str:
        words = draw(st.sampled_from(sentences)).split()
        k = draw(st.integers(min(MIN_PREFIX_WORDS, len(words)), len(words)))
        return " ".join(words[:k])

    return prefix()


def in_context(prefix: str, prompt: str) -> str:
    """``prompt`` after a context sentence: "<prefix>. <prompt>" (trailing punctuation of
    the prefix is dropped first)."""
    return f"{prefix.rstrip(' .,;:!?')}. {prompt}"


def neighbourhood(space: NeighbourSpace) -> st.SearchStrategy[Draw]:
    """The hypothesis strategy of out-of-scope prompts in ``space``.

    Raises:
        VerifyError: the space is empty.
    """
    parts: list[st.SearchStrategy[Draw]] = []
    if space.templates and space.subjects:
        parts.append(st.builds(_neighbour, st.sampled_from(space.templates),
                               st.sampled_from(space.subjects)))
    if space.subject_prompts:
        parts.append(st.sampled_from(space.subject_prompts).map(lambda p: Draw("subject", p)))
    if space.questions:
        parts.append(st.sampled_from(space.questions).map(lambda p: Draw("question", p)))
    if space.sentences:
        parts.append(context_prefix(space.sentences).map(lambda p: Draw("corpus", p)))
    if space.context and space.sentences and space.templates and space.subjects:
        parts.append(st.builds(lambda pre, d: Draw("neighbour+context", in_context(pre, d.prompt)),
                               context_prefix(space.sentences),
                               st.builds(_neighbour, st.sampled_from(space.templates),
                                         st.sampled_from(space.subjects))))
    if not parts:
        raise VerifyError("no out-of-scope prompts to draw a locality neighbourhood from")
    exclude = space.exclude
    return st.one_of(parts).filter(lambda d: d.prompt not in exclude)


@contextlib.contextmanager
def _fixed_constants() -> Iterator[None]:
    """Stop hypothesis mixing literals from local source files into draws.

    Hypothesis caches "local constants" from every non-library module loaded
    so far and draws them now and then; the sample would then depend on the
    import history of the process. This reaches into a private module, so any
    change there degrades to hypothesis's default behaviour, not an error.
    """
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants

        original = providers._get_local_constants
        empty = Constants()
    except (ImportError, AttributeError):  # pragma: no cover - other hypothesis versions
        yield
        return
    providers._get_local_constants = lambda: empty
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        yield
    finally:
        providers._get_local_constants = original
        providers.CONSTANTS_CACHE.cache.clear()


def _run(strategy: st.SearchStrategy[Draw], fn: Callable[[Draw], None], *,
         key: str, seed_value: int, max_examples: int, database: ExampleDatabase | None,
         phases: tuple[Phase, ...]) -> None:
    def locality_property(draw: Draw) -> None:
        fn(draw)

    # Distinguishes the example-database entry of each (edit, claim, space).
    locality_property._hypothesis_internal_add_digest = key.encode()  # type: ignore[attr-defined]
    # ``@seed`` fixes the random stream but also switches the database off;
    # applying ``@settings`` after it switches the database back on (a seeded
    # run that still saves and replays its failures).
    test = seed(seed_value)(given(strategy)(locality_property))
    test = settings(max_examples=max(1, max_examples), database=database, phases=phases,
                    deadline=None, derandomize=False, report_multiple_bugs=False,
                    print_blob=False, verbosity=Verbosity.quiet,
                    suppress_health_check=list(HealthCheck))(test)
    with _fixed_constants():
        test()


def sample(space: NeighbourSpace, n: int, *, key: str, seed_value: int) -> list[Draw]:
    """Draw (up to) ``n`` prompts from ``space``, deterministically for a seed."""
    if space.empty or n <= 0:
        return []
    return draw_from(neighbourhood(space), n, key=key, seed_value=seed_value)


def draw_from(strategy: st.SearchStrategy[Draw], n: int, *, key: str,
              seed_value: int) -> list[Draw]:
    """Draw (up to) ``n`` values of ``strategy``, deterministically for a seed (no database)."""
    draws: list[Draw] = []
    if n <= 0:
        return draws
    try:
        _run(strategy, draws.append, key=key, seed_value=seed_value, max_examples=n,
             database=None, phases=(Phase.generate,))
    except HypothesisException:  # e.g. Unsatisfiable: every candidate is in scope
        pass
    return draws


def replay(space: NeighbourSpace, database: ExampleDatabase | None, *, key: str,
           seed_value: int) -> list[Draw]:
    """The prompts stored for this property in ``database`` (read only)."""
    draws: list[Draw] = []
    if database is None or space.empty:
        return draws
    try:
        _run(neighbourhood(space), draws.append, key=key, seed_value=seed_value, max_examples=1,
             database=ReadOnlyDatabase(database), phases=(Phase.reuse,))
    except (HypothesisException, unittest.SkipTest):  # SkipTest: nothing stored
        pass
    return draws


class _Violation(Exception):
    def __init__(self, draw: Draw) -> None:
        super().__init__(draw.prompt)
        self.draw = draw


def minimal_failure(space: NeighbourSpace, fails: Callable[[Draw], bool], n: int, *, key: str,
                    seed_value: int, database: ExampleDatabase | None) -> Draw | None:
    """Search ``space`` for a prompt where ``fails`` holds, and shrink it.

    Replays the database first, then generates the same sequence as
    :func:`sample`, then shrinks the first failure to the simplest one. The
    shrunk example is saved in ``database``.

    Returns:
        The minimal failing draw, or None when none was found.
    """
    if space.empty:
        return None

    def check(draw: Draw) -> None:
        if fails(draw):
            raise _Violation(draw)

    try:
        _run(neighbourhood(space), check, key=key, seed_value=seed_value, max_examples=n,
             database=database,
             phases=(Phase.reuse, Phase.generate, Phase.shrink))
    except _Violation as v:
        return v.draw
    except HypothesisException:
        return None
    return None
