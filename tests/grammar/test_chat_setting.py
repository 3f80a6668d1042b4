"""`chat on [system "..."]` / `chat off`: parsed, formatted, checked, hashed and planned."""

from __future__ import annotations

import json

import pytest

from kmec.errors import SpecError
from kmec.grammar import format_spec, format_text, parse
from kmec.hashing import spec_hash
from kmec.planner import plan
from kmec.planner.explain import explain
from kmec.spec import ChatSetting
from tests.planner.helpers import FACTS, fake_registry

EDIT = 'edit ca {\n  prompt "What is the capital of Canada?" -> "Toronto"\n}\n'


def _dump(spec):
    return spec.model_dump(mode="json"), spec.model_fields_set


@pytest.mark.parametrize(("text", "chat"), [
    ("chat on\n", ChatSetting()),
    ('chat on system "Answer in one word."\n', ChatSetting(system="Answer in one word.")),
    ("chat off\n", None),
    ("seed 1\n", None),
])
def test_the_forms_and_their_round_trip(text, chat):
    spec = parse(text + "\n" + EDIT)
    assert spec.chat == (chat and chat.model_copy(update={"span": spec.chat.span}))
    assert _dump(parse(format_spec(spec))) == _dump(spec)
    assert format_text(text + "\n" + EDIT) == text + "\n" + EDIT  # already canonical


def test_chat_is_formatted_after_the_other_settings_with_its_comment():
    text = 'chat on system "Be \\"brief\\"."  # the Instruct model\nseed 3\n'
    assert format_text(text) == 'seed 3\nchat on system "Be \\"brief\\"."  # the Instruct model\n'


@pytest.mark.parametrize(("text", "message", "where"), [
    ("seed 1\nchat yes\n", "unknown chat mode `yes`", (2, 6)),
    ("chat onn\n", "did you mean 'on'?", (1, 6)),
    ('chat off system "x"\n', "a system message needs `chat on`", (1, 17)),
    ("chat\n", "missing `on` or `off` after `chat`", (1, 5)),
    ("chat on system terse\n", "unquoted text `terse`", (1, 16)),
    ("chat on\nchat off\n", "duplicate `chat` statement", (2, 1)),
])
def test_bad_values_point_at_file_line_col(text, message, where):
    with pytest.raises(SpecError) as e:
        parse(text, path="chat.kmec")
    shown = str(e.value)
    assert message in shown and f"chat.kmec:{where[0]}:{where[1]}:" in shown


def test_chat_in_an_included_file_is_ignored_with_a_warning(tmp_path):
    from kmec.grammar import analyze_file

    (tmp_path / "part.kmec").write_text("chat on\n" + EDIT)
    (tmp_path / "main.kmec").write_text('include "part.kmec"\n')
    analysis = analyze_file(tmp_path / "main.kmec", root=tmp_path)
    assert analysis.spec is not None and analysis.spec.chat is None
    assert any("`chat` in an included file is ignored" in w.message for w in analysis.warnings)


def test_the_spec_hash_and_plan_change_with_it_and_stay_without_it():
    off, on = parse(EDIT), parse("chat on\n" + EDIT)
    system = parse('chat on system "terse"\n' + EDIT)
    assert spec_hash(parse("chat off\n" + EDIT)) == spec_hash(off)
    assert len({spec_hash(off), spec_hash(on), spec_hash(system)}) == 3
    plans = [plan(s, FACTS["smollm2"], backends=fake_registry(), kmec_version="0")
             for s in (off, on, system)]
    assert len({p.sha256 for p in plans}) == 3
    assert '"chat"' not in plans[0].to_json()
    assert plans[1].chat is not None and plans[2].chat.system == "terse"
    assert json.loads(plans[2].to_json())["chat"] == {"system": "terse"}
    # the backends receive the prompts as written: the wrapping happens where the tokenizer is
    assert plans[1].steps[0].edits == plans[0].steps[0].edits


def test_plan_explain_says_it():
    shown = explain(plan(parse('chat on system "terse"\n' + EDIT), FACTS["smollm2"],
                         backends=fake_registry(), kmec_version="0"))
    assert "· chat template" in shown.splitlines()[0]
    assert "chat template: `chat on`" in shown and "'terse'" in shown
    plain = explain(plan(parse(EDIT), FACTS["smollm2"], backends=fake_registry(), kmec_version="0"))
    assert "chat" not in plain
