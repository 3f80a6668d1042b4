"""General-capability canaries: a held-out text slice and general questions.

Contents:
    CORPUS_SLICE       a few paragraphs of plain English prose (perplexity canary,
                       and sentence prefixes for locality sampling)
    GENERAL_QUESTIONS  prompts about common knowledge whose base answer must survive
    sentences()        CORPUS_SLICE cut into sentences

The text was written for kmec (no third-party source, same license as kmec).
It is deliberately ordinary: an edit of one fact must not make ordinary text
less likely, nor change what the model says about unrelated common knowledge.
Kept small on purpose: verification runs on a CPU in CI.
"""

from __future__ import annotations

import re

CORPUS_SLICE: tuple[str, ...] = (
    (
        "The river rises in a range of low hills and flows north for about two hundred "
        "kilometres before it reaches the sea. For most of its length it is slow and wide, "
        "and small boats carried grain and timber along it until the railway was built. "
        "Today the towns on its banks are known for their markets and old stone bridges."
    ),
    (
        "Bread is made by mixing flour, water, salt and yeast into a dough. The dough is "
        "left to rise, shaped into loaves and baked in a hot oven. Some bakers add seeds, "
        "milk or butter, and many families have a recipe they have used for generations."
    ),
    (
        "The committee met on Tuesday morning to discuss the budget for the coming year. "
        "After a long debate the members agreed to spend more on schools and roads, and "
        "they asked the treasurer to publish a report before the end of the month."
    ),
    (
        "Most birds build nests in the spring, when the days grow longer and food is easy "
        "to find. The female usually lays between two and six eggs, and both parents may "
        "take turns to keep them warm until the chicks hatch."
    ),
    (
        "A computer program is a list of instructions that a machine can follow. Programmers "
        "write these instructions in a language such as Python or C, and a compiler or an "
        "interpreter turns them into steps the processor can carry out."
    ),
    (
        "The small museum in the centre of the village holds tools, letters and photographs "
        "from the last two centuries. Volunteers open it on weekends, and school classes "
        "visit it to learn how people lived and worked in the region."
    ),
)

GENERAL_QUESTIONS: tuple[str, ...] = (
    "The capital of Japan is",
    "Water is made of hydrogen and",
    "The opposite of hot is",
    "Two plus two equals",
    "The first month of the year is",
    "The largest planet in the solar system is",
    "The chemical symbol for gold is",
    "A week has seven",
    "The sun rises in the",
    "The color of the sky on a clear day is",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences() -> tuple[str, ...]:
    """The corpus slice cut into sentences, in order.

    >>> sentences()[0].split()[:4]
    ['The', 'river', 'rises', 'in']
    """
    return tuple(s.strip() for p in CORPUS_SLICE for s in _SENTENCE_END.split(p) if s.strip())
