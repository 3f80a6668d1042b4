"""``explain``: a plan shown as text (and as rich renderables for the CLI)."""

from __future__ import annotations

from rich.console import Console

from kmec.planner import plan
from kmec.planner.explain import explain, explain_tree, summary_table
from tests.planner.helpers import kz, make_spec, prompt_edit, triple


def _plan(registry, smol):
    spec = make_spec(kz(expect_reversal=True), triple("fr", "France", "Lyon"))
    return plan(spec, smol, backends=registry, kmec_version="0")


def test_text_tree_lists_steps_edits_and_reasons(registry, smol):
    text = explain(_plan(registry, smol))
    lines = text.splitlines()
    assert lines[0].startswith("plan for smollm2-135m (LlamaForCausalLM, fingerprint fp-smollm2-1)")
    assert lines[1].startswith("1 step, ~") and "peak ~" in lines[1]
    assert "why:" in lines
    assert any(line.startswith("s01-memit  layers 4..8  3 edits") and
               "stats: layers 4..8, 100,000 tokens" in line for line in lines)
    assert ("    kazakhstan: 'The capital of Kazakhstan is' -> 'Nur-Sultan' "
            "(was 'Astana'; key 'Kazakhstan'; +1 scope)") in lines
    assert ("    kazakhstan~reverse: 'Nur-Sultan is the capital of' -> 'Kazakhstan' "
            "(key 'Nur-Sultan'; inverse)") in lines
    assert any(line.startswith("    - backend memit: 2 edits in one batch") for line in lines)


def test_reasons_can_be_left_out(registry, smol):
    text = explain(_plan(registry, smol), reasons=False)
    assert "why:" not in text and " - " not in text and "s01-memit" in text


def test_subjectless_edit_shows_its_key(registry, smol):
    spec = make_spec(prompt_edit("m", "The 2022 World Cup was won by", "Argentina"))
    assert "key: last prompt token" in explain(plan(spec, smol, backends=registry))


def _render(renderable) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_rich_tree_and_table_render(registry, smol):
    p = _plan(registry, smol)
    tree = _render(explain_tree(p))
    assert "s01-memit" in tree and "pair inverse edit kazakhstan~reverse" in tree
    table = _render(summary_table(p))
    assert "s01-memit" in table and "memit" in table and "4..8" in table
    assert "kazakhstan, kazakhstan~reverse, fr" in table


def test_an_edit_rome_draws_wordings_for_says_so(smol):
    """ROME draws wordings from the model for an edit that declares none
    (kmec.backends.wordings): the edit's line says how many it may draw (the real
    backends' defaults: the fake registry's parameters hold no ``value``)."""
    from kmec.backends import BACKENDS

    edit = prompt_edit("fr", "The capital of France is", "Lyon", subject="France")
    p = plan(make_spec(edit), smol, backends=BACKENDS)
    (step,) = p.steps
    assert step.backend == "rome" and not step.edits[0].scope
    assert "+ up to 3 wordings drawn from the model" in explain(p)
    assert "+ up to 3 wordings drawn from the model" in _render(explain_tree(p))
    # an edit that declares scope prompts, or a backend that draws none: nothing said
    declared = plan(make_spec(triple("fr", "France", "Lyon")), smol, backends=BACKENDS)
    assert declared.steps[0].backend == "rome" and "wordings drawn" not in explain(declared)
    two = plan(make_spec(edit, prompt_edit("de", "The capital of Germany is", "Bonn",
                                           subject="Germany")), smol, backends=BACKENDS)
    assert two.steps[0].backend == "memit" and "wordings drawn" not in explain(two)
