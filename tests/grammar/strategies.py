"""Hypothesis strategies for Specs: any representable Spec, and valid ones.

``specs()`` draws Specs with arbitrary strings (quotes, escapes, control
characters, any script) and keywords as names: what the lexical layer must
round-trip. ``valid_specs()`` draws Specs that also pass every semantic check.
Optional fields are sometimes left out and sometimes given their default, so
both ways ``model_fields_set`` can look are covered.
"""

from __future__ import annotations

from hypothesis import strategies as st

from kmec.grammar.errors import KEYWORDS
from kmec.spec import (
    METHODS,
    METRICS,
    ChatSetting,
    Claim,
    MethodHint,
    Probe,
    PromptEdit,
    Relation,
    Spec,
    TripleEdit,
)

NAMES = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.from_regex(r"[a-z]{1,5}(-[a-z0-9]{1,4}){1,2}", fullmatch=True),
    st.sampled_from(sorted(KEYWORDS)),
)
TEXT = st.text(max_size=24)
NUMBERS = st.floats(allow_nan=False, allow_infinity=False)
LAYERS = st.one_of(st.lists(st.integers(-50, 200), min_size=1, max_size=6).map(tuple),
                   st.tuples(st.integers(-5, 40), st.integers(2, 12)).map(
                       lambda t: tuple(range(t[0], t[0] + t[1]))))


def _some(draw, **options) -> dict:
    """A random subset of ``options`` (name -> strategy), drawn."""
    return {k: draw(v) for k, v in options.items() if draw(st.booleans())}


@st.composite
def method_hints(draw) -> MethodHint:
    return MethodHint(**_some(draw, method=st.sampled_from(METHODS), layers=LAYERS,
                              max_delta=NUMBERS, frozen=st.booleans()))


@st.composite
def relations(draw) -> Relation:
    return Relation(name=draw(NAMES), prompt=draw(TEXT), **_some(
        draw, paraphrases=st.lists(TEXT, max_size=3).map(tuple), reverse=TEXT,
        subjects=st.lists(TEXT, max_size=6).map(tuple), subjects_file=TEXT))


PROBES = st.builds(Probe, prompt=TEXT, target=TEXT)
EDIT_EXTRAS = {"scope": st.lists(TEXT, max_size=3).map(tuple),
               "preserve": st.lists(TEXT, max_size=3).map(tuple),
               "portability": st.lists(PROBES, max_size=2).map(tuple),
               "expect_reversal": st.booleans()}


@st.composite
def edits(draw) -> TripleEdit | PromptEdit:
    extras = _some(draw, **EDIT_EXTRAS)
    if draw(st.booleans()):
        return TripleEdit(name=draw(NAMES), subject=draw(TEXT), relation=draw(NAMES),
                          new=draw(TEXT), **extras, **_some(draw, old=TEXT))
    return PromptEdit(name=draw(NAMES), prompt=draw(TEXT), target=draw(TEXT), **extras,
                      **_some(draw, old=TEXT, subject=TEXT))


@st.composite
def claims(draw) -> Claim:
    return Claim(metric=draw(st.sampled_from(METRICS)), threshold=draw(NUMBERS), **_some(
        draw, sample=st.integers(-10, 10**6), neighbours_of=NAMES, kl=NUMBERS,
        protocol=st.sampled_from(["prob", "token", "greedy"])))


@st.composite
def specs(draw) -> Spec:
    return Spec(**_some(draw, model=TEXT, seed=st.integers(0, 2**64),
                        order=st.sampled_from(["batch", "sequence"]), method=method_hints(),
                        chat=st.one_of(st.none(), st.builds(
                            ChatSetting, system=st.one_of(st.none(), TEXT))),
                        relations=st.lists(relations(), max_size=3).map(tuple),
                        edits=st.lists(edits(), max_size=3).map(tuple),
                        claims=st.lists(claims(), max_size=3).map(tuple),
                        includes=st.lists(TEXT, max_size=2).map(tuple)))


# ---- valid specs ------------------------------------------------------------------------
WORDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"),
                min_size=1, max_size=16).filter(str.strip)
UNIT = st.floats(0, 1)


@st.composite
def valid_specs(draw) -> Spec:
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                          min_size=1, max_size=3, unique=True))
    rels = tuple(Relation(name=n, prompt=f"{draw(WORDS)} {{{{ subject }}}} {draw(WORDS)}",
                          reverse=f"{{{{ object }}}} {draw(WORDS)}",
                          subjects=tuple(draw(st.lists(WORDS, min_size=1, max_size=3))))
                 for n in names)
    subjects = draw(st.lists(WORDS, min_size=1, max_size=4, unique=True))
    edit_list: list[TripleEdit | PromptEdit] = [
        TripleEdit(name=f"e{i}", subject=s, relation=draw(st.sampled_from(names)),
                   new=draw(WORDS), expect_reversal=draw(st.booleans()),
                   preserve=tuple(draw(st.lists(WORDS, max_size=2))))
        for i, s in enumerate(subjects)]
    prompt = draw(WORDS)
    edit_list.append(PromptEdit(name="free", prompt=prompt, target=draw(WORDS),
                                subject=prompt[: draw(st.integers(1, len(prompt)))].strip()
                                or None,
                                portability=tuple(draw(st.lists(
                                    st.builds(Probe, prompt=WORDS, target=WORDS), max_size=2)))))
    method = draw(st.sampled_from(["auto", "memory"]))
    layers = tuple(sorted(set(draw(st.lists(st.integers(0, 29), min_size=1, max_size=5)))))
    claim_list = (Claim(metric="efficacy", threshold=draw(UNIT)),
                  Claim(metric="locality", threshold=draw(UNIT), sample=draw(st.integers(1, 999)),
                        neighbours_of=names[0], kl=draw(st.floats(0, 10))))
    return Spec(model=draw(WORDS), seed=draw(st.integers(0, 10**9)),
                order=draw(st.sampled_from(["batch", "sequence"])),
                method=MethodHint(method=method, layers=layers,
                                  max_delta=draw(st.floats(1e-6, 1)), frozen=draw(st.booleans())),
                relations=rels, edits=tuple(edit_list), claims=claim_list)
