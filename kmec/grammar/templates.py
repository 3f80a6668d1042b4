"""Prompt templates: a small subset of jinja2 with the variables ``subject`` and ``object``.

Contents:
    VARIABLES        the names a template may use
    FILTERS          the filters a template may apply to them
    MAX_PROMPT_CHARS the longest prompt a template may render to
    render()         a template with its variables filled in (checked, sandboxed, strict)
    inspect()        the variables a template uses, or why it is not allowed
    is_template()    whether a string contains jinja2 markup at all

Relation prompts are templates: ``"The capital of {{ subject }} is"``. A
template is text with ``{{ ... }}`` insertions of ``subject`` or ``object``,
optionally through filters (``{{ subject | lower }}``, ``{{ subject |
replace("_", " ") }}``) and joined with string constants (``{{ subject ~ "'s"
}}``); ``{% raw %}`` and ``{# comments #}`` work. Nothing else does: no loops,
conditions, calls, arithmetic, attribute access or assignments. Specs come
from pull requests, and a language that cannot loop or compute cannot hang
``kmec check`` or allocate gigabytes (``{{ 9**(9**10) }}``, ``{% for %}``
over ``range(100000)``, ``{{ 'a' * 10**10 }}``); the rules are checked on
the template's syntax tree before anything renders, in ``kmec check`` and
again at render time. Rendering still runs in jinja2's sandbox, and its
output is capped at ``MAX_PROMPT_CHARS``.

An undefined variable is an error, never an empty string: a prompt that
silently lost its subject would be scored against the wrong question.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from kmec.errors import Diagnostic, Span, SpecError

VARIABLES = ("subject", "object")
FILTERS = ("lower", "upper", "title", "capitalize", "trim", "replace")
MAX_PROMPT_CHARS = 10_000
_MAX_CONSTANT = 200  # characters in a string constant of a template
_SHAPES = {  # what a forbidden node is, in the words of the message
    "For": "loops ({% for %})", "If": "conditions ({% if %})", "CondExpr": "conditions",
    "Call": "function calls", "Getattr": "attribute access", "Getitem": "indexing",
    "Macro": "macros", "Assign": "assignments ({% set %})", "AssignBlock": "assignments",
    "Include": "includes", "Import": "imports", "FromImport": "imports",
    "Extends": "template inheritance", "Block": "blocks", "CallBlock": "call blocks",
    "FilterBlock": "filter blocks", "With": "with blocks", "Test": "tests (is ...)",
    "List": "lists", "Tuple": "tuples", "Dict": "dicts", "Slice": "slices",
}

_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class TemplateInfo:
    """What :func:`inspect` found: the variables used, or a syntax error."""

    variables: frozenset[str] = frozenset()
    error: str | None = None
    syntax: bool = False  # the error is a syntax error (not a rule of the language)


def is_template(text: str) -> bool:
    """Whether ``text`` contains jinja2 markup.

    >>> is_template("The capital of {{ subject }} is"), is_template("Paris is")
    (True, False)
    """
    return "{{" in text or "{%" in text or "{#" in text


def _forbidden(node: nodes.Node) -> str | None:
    """Why ``node`` (or a node below it) is outside the template language, or None."""
    kind = type(node).__name__
    if isinstance(node, (nodes.Template, nodes.Output, nodes.Concat)):
        children = list(node.iter_child_nodes())
    elif isinstance(node, nodes.TemplateData):
        return None
    elif isinstance(node, nodes.Name):
        return None if node.ctx == "load" else "assignments"
    elif isinstance(node, nodes.Const):
        if isinstance(node.value, str) and len(node.value) <= _MAX_CONSTANT:
            return None
        return ("numbers" if not isinstance(node.value, str)
                else f"string constants over {_MAX_CONSTANT} characters")
    elif isinstance(node, nodes.Filter):
        if node.name not in FILTERS:
            return f"the filter `{node.name}`"
        if node.kwargs or node.dyn_args is not None or node.dyn_kwargs is not None:
            return "filter keyword arguments"
        if node.node is None:
            return "filter blocks"
        if not all(isinstance(a, nodes.Const) for a in node.args):
            return "filter arguments other than constants"
        children = [node.node, *node.args]
    else:
        return _SHAPES.get(kind, "operators" if isinstance(node, nodes.BinExpr | nodes.UnaryExpr)
                           else f"`{kind}` expressions")
    return next((why for child in children if (why := _forbidden(child)) is not None), None)


@functools.lru_cache(maxsize=4096)
def inspect(template: str) -> TemplateInfo:
    """The undeclared variables ``template`` uses, or why it cannot be used.

    >>> sorted(inspect("{{ object }} is the capital of").variables)
    ['object']
    >>> inspect("{{ subject }").error
    "unexpected '}'"
    >>> inspect("{% for x in range(9) %}{{ subject }}{% endfor %}").error
    'templates may not use loops ({% for %}); write {{ subject }} or {{ subject | lower }}'
    """
    if len(template) > MAX_PROMPT_CHARS:
        return TemplateInfo(error=f"the template is {len(template):,} characters long, over "
                            f"{MAX_PROMPT_CHARS:,}")
    try:
        ast = _ENV.parse(template)
    except jinja2.TemplateSyntaxError as e:
        return TemplateInfo(error=e.message or "template syntax error", syntax=True)
    except RecursionError:
        return TemplateInfo(error="the template nests too deeply", syntax=True)
    try:
        why = _forbidden(ast)
    except RecursionError:
        why = "deep nesting"
    if why is not None:
        return TemplateInfo(error=f"templates may not use {why}; write {{{{ subject }}}} or "
                            "{{ subject | lower }}")
    return TemplateInfo(variables=frozenset(meta.find_undeclared_variables(ast)))


@functools.lru_cache(maxsize=4096)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)


def render(template: str, *, subject: str, object: str | None = None) -> str:
    """Fill in a prompt template.

    Args:
        template: jinja2 text using ``subject`` and/or ``object``.
        subject: the relation's subject.
        object: the relation's object (reverse templates); leave it out for
            forward prompts, so a template that uses it raises.

    Returns:
        The prompt text.

    Raises:
        SpecError: the template does not parse, is outside the template
            language, uses an undefined variable, or renders a prompt over
            ``MAX_PROMPT_CHARS``.

    >>> render("The capital of {{ subject }} is", subject="France")
    'The capital of France is'
    >>> render("{{ object }} is the capital of", subject="France", object="Paris")
    'Paris is the capital of'
    """
    values = {"subject": subject} if object is None else {"subject": subject, "object": object}
    info = inspect(template)
    longest = max(len(subject), len(object or ""))
    try:
        if info.error is not None:
            problem = f"template syntax error: {info.error}" if info.syntax else info.error
        elif longest > MAX_PROMPT_CHARS:  # a filter could multiply it (replace)
            problem = f"a subject or object of {longest:,} characters, over {MAX_PROMPT_CHARS:,}"
        else:
            text = _compile(template).render(**values)
            if len(text) <= MAX_PROMPT_CHARS:
                return text
            problem = f"the prompt is {len(text):,} characters long, over {MAX_PROMPT_CHARS:,}"
    except jinja2.TemplateSyntaxError as e:
        problem = f"template syntax error: {e.message}"
    except jinja2.UndefinedError as e:
        problem = f"template uses an undefined variable ({e.message})"
    except jinja2.exceptions.SecurityError as e:
        problem = f"template does something the sandbox forbids ({e})"
    except RecursionError:
        problem = "template nests too deeply"
    except Exception as e:  # noqa: BLE001 -- a filter raising on bad input is still the template's fault
        problem = f"template failed to render: {type(e).__name__}: {e}"
    hint = "templates may use {{ subject }} and {{ object }}"
    raise SpecError([Diagnostic(Span(file="<template>"), f"{problem} in {template!r}", hint)])
