"""`chat on`: prompts asked through a model's chat template (kmec.models.chat and its users).

A real Hugging Face fast tokenizer (bytes plus two special tokens, ChatML template)
checks the frame against ``apply_chat_template`` and the subject's position in a
wrapped prompt; a byte tokenizer with a template in Python drives the tiny models
through ``execute`` and ``verify``.
"""

from __future__ import annotations

import math

import pytest

from kmec.errors import ModelError
from kmec.models.chat import ChatFrame, chat_frame, has_chat_template
from kmec.planner.model import Chat, EditRequest, Step
from kmec.verify.scoring import Item, ScoreCache, encode_item, score_items
from tests.conftest import ByteTokenizer

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPT = "What is the capital of Canada?"


@pytest.fixture(scope="module")
def hf_tok():
    """A byte-level BPE tokenizer with no merges (one token per byte) and ChatML markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    t = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


class ChatByteTokenizer(ByteTokenizer):
    """The tiny models' byte tokenizer with a chat template (rendered in Python)."""

    chat_template = "[U]...[/U][A]"

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        system = [m["content"] for m in messages if m["role"] == "system"]
        user = [m["content"] for m in messages if m["role"] == "user"]
        head = f"[S]{system[0] if system else 'be brief'}[/S]"
        return head + "".join(f"[U]{u}[/U]" for u in user) + ("[A]" if add_generation_prompt else "")


def test_the_frame_wraps_a_prompt_as_apply_chat_template_does(hf_tok):
    frame = chat_frame(hf_tok)
    want = hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                      add_generation_prompt=True)
    assert frame.wrap(PROMPT) == want
    assert frame.wrap(PROMPT).endswith("<|im_start|>assistant\n")
    assert want.index(PROMPT) == frame.user_start


def test_a_system_message_replaces_the_templates_default(hf_tok):
    frame = chat_frame(hf_tok, system="Answer in one word.")
    assert frame.head == "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n"
    assert "helpful" not in frame.wrap(PROMPT)


def test_markers_become_the_tokenizers_special_ids(hf_tok):
    ids = hf_tok(chat_frame(hf_tok).wrap("hi"), add_special_tokens=False)["input_ids"]
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in ids


def test_a_model_without_a_chat_template_is_refused_with_the_fix():
    tok = ByteTokenizer()
    assert not has_chat_template(tok)
    with pytest.raises(ModelError) as e:
        chat_frame(tok, model="gpt2-small")
    assert "gpt2-small has no chat template" in e.value.message
    assert "remove the `chat` setting" in e.value.hint


def test_a_template_that_refuses_a_system_message_says_so():
    tok = ChatByteTokenizer()

    def refuse(messages, **_):
        if messages[0]["role"] == "system":
            raise ValueError("System role not supported")
        return "[U]" + messages[0]["content"] + "[/U][A]"

    tok.apply_chat_template = refuse
    assert chat_frame(tok).wrap("x") == "[U]x[/U][A]"
    with pytest.raises(ModelError) as e:
        chat_frame(tok, system="terse")
    assert "System role not supported" in e.value.message and "system" in e.value.hint


def test_rome_memit_keys_read_the_subject_inside_the_wrapped_prompt(hf_tok):
    from kmec.backends.keys import build_batch
    from kmec.compile import chat_step

    req = EditRequest(name="ca", prompt=PROMPT, subject="Canada", target_new="Toronto")
    step = chat_step(Step(id="s01", backend="rome", edits=(req,)), chat_frame(hf_tok))
    prefixes = ["", "Because it rained. "]
    batch = build_batch(hf_tok, step.edits, prefixes, with_targets=True)
    for row, prefix in enumerate(prefixes):
        text = prefix + step.edits[0].prompt
        offsets = hf_tok(text, return_offsets_mapping=True,
                         add_special_tokens=False)["offset_mapping"]
        a, b = offsets[int(batch.lookup[row])]
        assert text[a - 5:b] == "Canada" and a > text.index("<|im_start|>user")
        answer = [t for r, _, t in batch.target_pos if r == row]
        assert hf_tok.decode(answer) == "Toronto"  # the assistant's answer, no leading space


def test_chat_step_wraps_every_prompt_but_not_the_targets():
    from kmec.compile import chat_step

    frame = ChatFrame("<u>", "</u><a>")
    req = EditRequest(name="ca", prompt=PROMPT, subject="Canada", target_new="Toronto",
                      scope=("Canada's capital?",), preserve=("Capital of Peru?",))
    step = Step(id="s01-rome", backend="rome", edits=(req,), protect=("Capital of Chile?",))
    out = chat_step(step, frame).edits[0]
    assert (out.prompt, out.scope, out.preserve, out.target_new) == (
        f"<u>{PROMPT}</u><a>", ("<u>Canada's capital?</u><a>",), ("<u>Capital of Peru?</u><a>",),
        "Toronto")
    assert chat_step(step, frame).protect == ("<u>Capital of Chile?</u><a>",)


def test_chat_step_refuses_a_subject_the_system_text_names():
    from kmec.compile import chat_step

    req = EditRequest(name="hf", prompt="Who made SmolLM?", subject="SmolLM", target_new="X")
    with pytest.raises(ModelError) as e:
        chat_step(Step(id="s01", backend="rome", edits=(req,)),
                  ChatFrame("<s>You are SmolLM</s><u>", "</u>"))
    assert "'SmolLM'" in e.value.message and "chat on system" in e.value.hint


def test_encode_item_asks_the_prompt_as_a_user_turn(hf_tok):
    frame = chat_frame(hf_tok)
    enc = encode_item(hf_tok, Item(PROMPT, "Toronto"), frame)
    wrapped = hf_tok(frame.wrap(PROMPT), add_special_tokens=False)["input_ids"]
    assert enc.n_prompt == len(wrapped) and list(enc.ids[:enc.n_prompt]) == wrapped
    assert hf_tok.decode(enc.target_ids) == "Toronto"  # the answer: no leading space
    plain = encode_item(hf_tok, Item(PROMPT, "Toronto"))
    assert hf_tok.decode(plain.target_ids) == " Toronto" and plain.n_prompt == len(PROMPT)


# ---------------------------------------------------------------- through the tiny models


def _plan(chat: Chat | None):
    from kmec.planner.model import Plan

    req = EditRequest(name="ca", prompt="The capital of Canada is", subject="Canada",
                      target_new="Rome")
    step = Step(id="s01-rome", backend="rome", edits=(req,), layers=(1,),
                writes=("model.layers.1.mlp.down_proj.weight",))
    return Plan(kmec_version="0", spec_hash="0" * 64, model="tiny", model_fingerprint="f" * 64,
                model_arch="LlamaForCausalLM", seed=0, order="batch", steps=(step,), chat=chat)


def _loaded(tok):
    from kmec.models.facts import facts_from_config
    from kmec.models.load import LoadedModel
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama")
    facts = facts_from_config(model.config, name="tiny", fingerprint="f" * 64)
    return LoadedModel(model=model, tok=tok, facts=facts, ref=None)


def test_execute_hands_the_backends_wrapped_prompts(monkeypatch, tmp_path):
    import kmec.compile as compile_mod

    monkeypatch.setenv("KMEC_HOME", str(tmp_path))
    seen: list[Step] = []
    monkeypatch.setattr(compile_mod, "_run_step",
                        lambda step, *a, **k: seen.append(step) or [])
    lm = _loaded(ChatByteTokenizer())
    compile_mod.execute(_plan(Chat(system="terse")), lm, use_cache=False)
    compile_mod.execute(_plan(None), lm, use_cache=False)
    assert seen[0].edits[0].prompt == "[S]terse[/S][U]The capital of Canada is[/U][A]"
    assert seen[1].edits[0].prompt == "The capital of Canada is"


def test_execute_refuses_chat_on_a_model_without_a_template(tmp_path, monkeypatch):
    from kmec.compile import execute

    monkeypatch.setenv("KMEC_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="tiny has no chat template"):
        execute(_plan(Chat()), _loaded(ByteTokenizer()), use_cache=False)


def test_score_cache_and_verify_score_the_wrapped_prompt():
    from kmec.spec import ChatSetting, Claim, PromptEdit, Spec
    from kmec.verify import verify
    from tests.conftest import build_tiny_model

    model, tok = build_tiny_model("llama"), ChatByteTokenizer()
    frame = chat_frame(tok)
    item = Item("The capital of Canada is", "Rome")
    direct = score_items([model], tok, [Item(frame.wrap(item.prompt), item.target)])[0][0]
    cached = ScoreCache([model], tok, chat=frame).get(item)[0]
    assert cached.target_logprobs == pytest.approx(direct.target_logprobs)

    edit = PromptEdit(name="ca", prompt=item.prompt, target=item.target, subject="Canada")
    claims = (Claim(metric="efficacy", threshold=0.5),)
    spec = Spec(model="tiny", edits=(edit,), claims=claims, chat=ChatSetting())
    report = verify(spec, None, model, model, tok, seed=0)
    assert report.edits[0].base.p_target == pytest.approx(direct.prob, rel=1e-4)
    plain = verify(spec.model_copy(update={"chat": None}), None, model, model, tok, seed=0)
    assert not math.isclose(plain.edits[0].base.p_target, direct.prob, rel_tol=1e-4)
    with pytest.raises(ModelError, match="no chat template"):
        verify(spec, None, model, model, ByteTokenizer(), seed=0)
