"""Prompt templates: jinja2 in a sandbox, with the variables ``subject`` and ``object``.

Contents:
    VARIABLES        the names a template may use
    render()         a template with its variables filled in (sandboxed, strict)
    inspect()        the variables a template uses, or its syntax error
    is_template()    whether a string contains jinja2 markup at all

Relation prompts are templates: ``"The capital of {{ subject }} is"``. Filters
work (``{{ subject | lower }}``); anything else a sandbox forbids (attribute
access to internals, ``import``) raises. An undefined variable is an error,
never an empty string: a prompt that silently lost its subject would be
scored against the wrong question.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from kmec.errors import Diagnostic, Span, SpecError

VARIABLES = ("subject", "object")

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


def is_template(text: str) -> bool:
    """Whether ``text`` contains jinja2 markup.

    >>> is_template("The capital of {{ subject }} is"), is_template("Paris is")
    (True, False)
    """
    return "{{" in text or "{%" in text or "{#" in text


@functools.lru_cache(maxsize=4096)
def inspect(template: str) -> TemplateInfo:
    """The undeclared variables ``template`` uses, or its syntax error.

    >>> sorted(inspect("{{ object }} is the capital of").variables)
    ['object']
    >>> inspect("{{ subject }").error
    "unexpected '}'"
    """
    try:
        ast = _ENV.parse(template)
        return TemplateInfo(variables=frozenset(meta.find_undeclared_variables(ast)))
    except jinja2.TemplateSyntaxError as e:
        return TemplateInfo(error=e.message or "template syntax error")
    except RecursionError:
        return TemplateInfo(error="the template nests too deeply")


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
        SpecError: the template does not parse, uses an undefined variable, or
            does something the sandbox forbids.

    >>> render("The capital of {{ subject }} is", subject="France")
    'The capital of France is'
    >>> render("{{ object }} is the capital of", subject="France", object="Paris")
    'Paris is the capital of'
    """
    values = {"subject": subject} if object is None else {"subject": subject, "object": object}
    try:
        return _compile(template).render(**values)
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
