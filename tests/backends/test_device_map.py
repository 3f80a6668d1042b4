"""Backends on models placed by accelerate (a per-layer device_map) and on bf16 weights.

Here every module of the map is on the CPU: accelerate still wraps each one in its
hooks, and every key, target value and solve must find its layer's device by lookup;
the edit must be the plain model's, bit for bit. The map over two GPUs runs where they
exist. In bf16 the weights are bf16 while δ, the loss and the solves stay float32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kmec.artifacts import apply, build_artifact
from kmec.artifacts.payloads import LowRank
from kmec.backends import get_backend
from kmec.planner.model import EditRequest, Step
from tests.backends.conftest import ctx_for
from tests.backends.test_rank_one import says
from tests.conftest import SpaceLetterTokenizer, build_tiny_model

EDITS = tuple(EditRequest(name=f"e{i}", prompt=f"The key of {s}", subject=s, target_new=t)
              for i, (s, t) in enumerate([("abc", "Q"), ("xyz", "R")]))
VALUE = {"steps": 40, "weight_decay": 0.0, "clamp": 1e4}
# "bit for bit" holds in float32; in bf16 (compute "auto" on a CPU with bf16 units) the
# mapped model's bf16 copy may round the upper blocks differently
EXACT = {**VALUE, "compute": "float32"}


def dispatched(model, devices):
    """``model`` under accelerate's hooks: embeddings, each layer, norm and head on
    ``devices[i % len(devices)]``."""
    from accelerate import dispatch_model

    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm",
             "model.rotary_emb", "lm_head"]
    dm = {n: devices[min(i, len(names) - 1) * len(devices) // len(names)]
          for i, n in enumerate(names)}
    return dispatch_model(model, device_map=dm, force_hooks=True)


def run(backend, model, layers, tmp_path, edits=EDITS, value=VALUE):
    step = Step(id=f"s01-{backend}", backend=backend, edits=edits, layers=layers,
                params={"value": value, **({"lambda_rel": 0.01} if backend != "rome" else {})})
    ctx = ctx_for(model, SpaceLetterTokenizer(), list(layers), tmp_path)
    return get_backend(backend).execute(step, ctx)


@pytest.mark.parametrize("backend,layers,edits", [("rome", (1,), EDITS[:1]),
                                                  ("memit", (1, 2), EDITS)])
def test_device_map_edit_is_the_plain_models(backend, layers, edits, tmp_path):
    plain = build_tiny_model("llama", seed=5)
    mapped = dispatched(copy.deepcopy(plain), ["cpu"])
    assert hasattr(mapped.model.layers[1], "_hf_hook")  # accelerate's hooks are in place
    a = run(backend, plain, layers, tmp_path / "a", edits, EXACT)
    b = run(backend, mapped, layers, tmp_path / "b", edits, EXACT)
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        assert pa.param == pb.param
        assert torch.allclose(pa.u, pb.u, atol=1e-5, rtol=1e-4)
        assert torch.allclose(pa.v, pb.v, atol=1e-5, rtol=1e-4)
    art = build_artifact([("s01", b)], base_model="tiny", base_fingerprint="", base_arch="x",
                         weight_layout="out_in", plan_hash="h")
    apply(art, mapped, check=False)
    assert says(mapped, SpaceLetterTokenizer(), edits[0].prompt, edits[0].target_new)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_map_over_two_gpus_makes_the_same_edit(tmp_path):
    plain = build_tiny_model("llama", seed=5)
    mapped = dispatched(copy.deepcopy(plain), ["cuda:0", "cuda:1"])
    a = run("memit", plain, (1, 2), tmp_path / "a")
    b = run("memit", mapped, (1, 2), tmp_path / "b")
    for pa, pb in zip(a, b):
        assert torch.allclose(pa.u, pb.u.cpu(), atol=1e-3, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_edit_matches_the_cpu_edit(tmp_path):
    plain = build_tiny_model("llama", seed=5)
    a = run("rome", plain, (1,), tmp_path / "a", EDITS[:1])
    b = run("rome", copy.deepcopy(plain).to("cuda"), (1,), tmp_path / "b", EDITS[:1])
    assert torch.allclose(a[0].u, b[0].u.cpu(), atol=1e-3, rtol=1e-2)


def test_bf16_weights_edit_reaches_its_target_with_float32_math(tmp_path):
    model = build_tiny_model("llama", seed=5).to(torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    payloads = run("rome", model, (1,), tmp_path, EDITS[:1])
    p = payloads[0]
    assert p.u.dtype == p.v.dtype == torch.float32  # the solve is float32
    assert torch.isfinite(p.u).all() and torch.isfinite(p.v).all()
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())
    art = build_artifact([("s01", payloads)], base_model="tiny", base_fingerprint="",
                         base_arch="x", weight_layout="out_in", plan_hash="h")
    assert all(t.dtype == torch.float32 for t in art.tensors.values())
    handle = apply(art, model, check=False)
    assert model.get_parameter(p.param).dtype == torch.bfloat16
    assert says(model, SpaceLetterTokenizer(), EDITS[0].prompt, EDITS[0].target_new)
    handle.revert()
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())


def test_payloads_are_stored_in_float32_and_applied_in_the_weights_dtype():
    """A delta computed in bf16 is stored in float32; an fp32 delta applied to bf16 weights
    and a bf16-computed one applied to fp32 weights both land in the weights' dtype."""
    model = build_tiny_model("gpt2", seed=1)
    name = "transformer.h.1.mlp.c_proj.weight"
    w = model.get_parameter(name)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(w.shape[1], 1, generator=g), torch.randn(w.shape[0], 1, generator=g)
    low = LowRank(name, u.bfloat16(), v.bfloat16(), 0.5)
    art = build_artifact([("s01", [low])], base_model="tiny", base_fingerprint="",
                         base_arch="x", weight_layout="in_out", plan_hash="h")
    assert {t.dtype for t in art.tensors.values()} == {torch.float32}
    expected = 0.5 * (u.bfloat16().float() @ v.bfloat16().float().T).T
    w32 = w.detach().clone()
    apply(art, model, check=False)
    assert torch.allclose(model.get_parameter(name), w32 + expected, atol=1e-6)
    half = build_tiny_model("gpt2", seed=1).to(torch.bfloat16)
    w16 = half.get_parameter(name).detach().clone()
    apply(art, half, check=False)
    got = half.get_parameter(name)
    assert got.dtype == torch.bfloat16 and torch.equal(got, w16 + expected.bfloat16())
