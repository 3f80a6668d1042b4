"""Shared fixtures: tiny random models of each supported family, and the real one.

Tiny models are built in-process from a config (seconds, no downloads) with a
fixed seed, so unit tests are fast and deterministic. ``real_model`` loads the
embedded SmolLM2-135M (installing it into KMEC_HOME on first use); tests that
use it are marked ``slow``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama")


@pytest.fixture(autouse=True)
def _no_columns(monkeypatch):
    """Output as in a CI log: pytest-xdist starts its workers with COLUMNS=80 (seen here),
    which would make the CLI wrap and cut what a plain run prints in full. A test that
    wants a width sets COLUMNS itself."""
    monkeypatch.delenv("COLUMNS", raising=False)


def tiny_config(family: str):
    """A small config of ``family`` (4 layers, d_model 32, vocab 128)."""
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(n_layer=4, n_embd=32, n_head=4, n_inner=64, vocab_size=128,
                          n_positions=64, architectures=["GPT2LMHeadModel"])
    if family == "gptj":
        return GPTJConfig(n_layer=4, n_embd=32, n_head=4, n_inner=64, vocab_size=128,
                          n_positions=64, rotary_dim=4, architectures=["GPTJForCausalLM"])
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                             intermediate_size=64, vocab_size=128, max_position_embeddings=64,
                             architectures=["GPTNeoXForCausalLM"])
    if family == "llama":
        return LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                           max_position_embeddings=64, tie_word_embeddings=True,
                           architectures=["LlamaForCausalLM"])
    raise ValueError(family)


def build_tiny_model(family: str, seed: int = 0):
    """A randomly initialised model of ``family`` in eval mode (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    model.requires_grad_(False)
    return model


class ByteTokenizer:
    """A tiny deterministic tokenizer for tiny models: one token per byte (mod vocab).

    Enough of the Hugging Face tokenizer interface for kmec's code paths:
    ``__call__`` (with padding), ``encode``, ``decode``, pad/eos ids.
    """

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self.pad_token_id = 0
        self.bos_token_id = None
        self.eos_token = "\x00"
        self.pad_token = "\x00"
        self.padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1 + (b % (self.vocab_size - 1)) for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes((i - 1) % 256 for i in ids if i != 0).decode("utf-8", "replace")

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True,
                 return_offsets_mapping=False, **_):
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = [self.encode(t) for t in batch]
        width = max((len(x) for x in ids), default=0)
        if padding or (return_tensors and len(ids) > 1):
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
            ids = [x + [self.pad_token_id] * (width - len(x)) for x in ids]
            if self.padding_side == "left":
                mask = [m[len(x):] + m[:len(x)] for m, x in zip(mask, ids)]
        else:
            mask = [[1] * len(x) for x in ids]
        out = {"input_ids": ids, "attention_mask": mask}
        if return_offsets_mapping:
            out["offset_mapping"] = [[(i, i + 1) for i in range(len(t.encode()))] for t in batch]
        if return_tensors == "pt":
            out = {k: torch.tensor(v) for k, v in out.items()}
        elif single:
            out = {k: v[0] for k, v in out.items()}
        return out


class SpaceLetterTokenizer(ByteTokenizer):
    """ByteTokenizer, except that a space before a capital letter is one token
    (as " Paris" is one BPE token), so a target is predicted right after the
    subject's last token rather than after a shared space token."""

    def _pieces(self, text: str) -> list[tuple[int, int, int]]:
        raw, out, i = text.encode("utf-8"), [], 0
        while i < len(raw):
            if raw[i] == 32 and i + 1 < len(raw) and 65 <= raw[i + 1] <= 90:
                out.append((raw[i + 1] - 63, i, i + 2))  # ids 2..27 are unused by bytes
                i += 2
            else:
                out.append((1 + raw[i] % (self.vocab_size - 1), i, i + 1))
                i += 1
        return out

    def encode(self, text, add_special_tokens=False):
        return [t for t, _, _ in self._pieces(text)]

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(" " + chr(i + 63) if 2 <= i <= 27 else chr((i - 1) % 256)
                       for i in ids if i != 0)

    def __call__(self, texts, return_offsets_mapping=False, **kw):
        out = super().__call__(texts, **kw)
        if return_offsets_mapping:
            offs = [[(a, b) for _, a, b in self._pieces(t)]
                    for t in ([texts] if isinstance(texts, str) else texts)]
            out["offset_mapping"] = offs[0] if isinstance(texts, str) else offs
        return out


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """One tiny model per family, built once per session."""
    return {f: build_tiny_model(f) for f in FAMILIES}


@pytest.fixture()
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def kmec_home(tmp_path_factory) -> Iterator[Path]:
    """KMEC_HOME for the session: the user's (so the real model is installed once)."""
    yield Path(os.environ.get("KMEC_HOME") or Path.home() / ".cache" / "kmec")


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M (LoadedModel), installed on first use."""
    from kmec.models.load import install_alias, load_model

    install_alias("smollm2-135m")
    return load_model("smollm2-135m")


class CorpusStats:
    """Second moments of a tiny model's MLP keys over random token sequences (seeded)."""

    def __init__(self, model, adapter, layers):
        from kmec.models.hooks import TraceDict

        torch.manual_seed(1)
        ids = torch.randint(1, 127, (8, 32))
        paths = [adapter.site("mlp_out", layer) for layer in sorted(layers)]
        with TraceDict(model, paths, retain_input=True, stop=True) as td:
            model(ids)
        self.c = {}
        for layer, p in zip(sorted(layers), paths):
            k = td[p].input.reshape(-1, td[p].input.shape[-1]).double()
            self.c[layer] = (k.T @ k / k.shape[0]).float()

    def second_moment(self, layer):
        return self.c[layer]


def make_tiny_embedder(folder: Path) -> Path:
    """A random 2-layer BERT with a character WordPiece vocabulary, saved as a model folder
    (a stand-in for MiniLM in the retrieval backend's tests)."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,!?:'")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *("##" + c for c in chars)]
    t = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- hand-made artifacts

from kmec.artifacts import LowRank, build_artifact
from kmec.models.adapters import adapter_for
from kmec.models.load import fingerprint_model


def tiny_ft_pipeline(monkeypatch, *, steps: int):
    """Make every model reference load one tiny Llama, and ``ft`` train ``steps`` steps:
    a whole compile/verify on it runs in seconds with no statistics pass. Returns the
    LoadedModel that ``load_model`` hands out."""
    from kmec.backends import BACKENDS
    from kmec.backends.finetune import FinetuneParams
    from kmec.models.facts import facts_from_config
    from kmec.models.load import LoadedModel, ModelRef, fingerprint_model

    model = build_tiny_model("llama", seed=5)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fingerprint_model(model))
    loaded = LoadedModel(model, SpaceLetterTokenizer(), facts, ModelRef("tiny", "folder", None))

    def load(ref, **_):
        return LoadedModel(model, loaded.tok, facts, ModelRef(str(ref), "folder", None))

    monkeypatch.setattr("kmec.models.load.load_model", load)
    monkeypatch.setattr("kmec.pipeline.resolve_ref", lambda ref: ModelRef(ref, "folder", None))
    monkeypatch.setattr(type(BACKENDS["ft"]), "default_params",
                        lambda self, facts: FinetuneParams(lr=1e-4, steps=steps))
    return loaded


def mlp_out_param(model, layer: int = 1) -> str:
    """The MLP output weight of ``layer`` in ``model``."""
    return adapter_for(model.config.model_type).site("mlp_out", layer) + ".weight"


def rank_one(model, layer: int = 1, seed: int = 0, scale: float = 0.5) -> LowRank:
    """A hand-made rank-one payload on ``layer``'s MLP output weight."""
    name = mlp_out_param(model, layer)
    w = model.get_parameter(name)
    layout = adapter_for(model.config.model_type).weight_layout
    d_out, d_in = w.shape if layout == "out_in" else tuple(reversed(w.shape))
    g = torch.Generator().manual_seed(seed)
    return LowRank(name, torch.randn(d_out, 1, generator=g), torch.randn(d_in, 1, generator=g),
                   scale)


def artifact_for(model, payloads, *, fingerprint: str | None = None, base_model: str = "tiny"):
    """An artifact of hand-made ``payloads`` for ``model`` (one step, ``s01-hand``)."""
    adapter = adapter_for(model.config.model_type)
    fp = fingerprint if fingerprint is not None else fingerprint_model(model)
    return build_artifact([("s01-hand", payloads)], base_model=base_model, base_fingerprint=fp,
                          base_arch=model.config.architectures[0],
                          weight_layout=adapter.weight_layout, plan_hash="h" * 64)


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_identical(model, snap) -> None:
    """Every parameter equals its snapshot bit for bit."""
    params = dict(model.named_parameters())
    assert params.keys() == snap.keys()
    for n, p in params.items():
        assert p.dtype == snap[n].dtype and torch.equal(p, snap[n]), n


def kmec_cli(*args, cwd):
    """``python -m kmec ARGS`` in ``cwd`` (a child process: the real entry point)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, "-m", "kmec", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)
