"""Same spec + facts + kmec version -> byte-identical plan, in this process and another."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kmec.errors import Span
from kmec.hashing import canonical_json, sha256_text, spec_hash
from kmec.planner import plan
from tests.planner.helpers import FACTS, fake_registry, kz, make_spec, many

SCRIPT = textwrap.dedent("""
    import sys
    from kmec.planner import plan
    from tests.planner.helpers import FACTS, fake_registry, kz, make_spec, many
    spec = make_spec(kz(expect_reversal=True), *many(4), seed=7)
    p = plan(spec, FACTS["smollm2"], backends=fake_registry(), kmec_version="9.9.9")
    sys.stdout.write(p.to_json())
""")


def _plan():
    spec = make_spec(kz(expect_reversal=True), *many(4), seed=7)
    return plan(spec, FACTS["smollm2"], backends=fake_registry(), kmec_version="9.9.9")


def test_plan_is_identical_across_runs():
    assert _plan().to_json() == _plan().to_json()


def test_plan_is_identical_across_processes():
    # a different hash seed in the child catches any dependence on set/dict order of strings
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""},
                         cwd=str(__import__("pathlib").Path(__file__).parents[2])).stdout
    assert out == _plan().to_json()
    assert sha256_text(out) == _plan().sha256


def test_provenance_fields(smol, registry):
    spec = make_spec(kz(), seed=42)
    p = plan(spec, smol, backends=registry, kmec_version="1.2.3")
    assert p.kmec_version == "1.2.3"
    assert p.seed == 42 and p.order == "batch"
    assert p.model == "smollm2-135m" and p.model_fingerprint == "fp-smollm2-135m"
    assert p.model_arch == "LlamaForCausalLM"
    assert p.spec_hash == sha256_text(canonical_json(spec.model_dump(mode="json")))


def test_default_kmec_version(smol, registry):
    from kmec import __version__

    assert plan(make_spec(kz()), smol, backends=registry).kmec_version == __version__


def test_spec_hash_ignores_spans_and_source():
    a = make_spec(kz())
    b = a.model_copy(update={"span": Span(file="x.kmec", line=3), "source": "x.kmec"})
    assert spec_hash(a) == spec_hash(b)
    assert spec_hash(a) != spec_hash(make_spec(kz(), seed=1))


def test_step_ids_are_stable_and_padded(smol, registry):
    p = plan(make_spec(*many(12), method="rome"), smol, backends=registry)
    assert [s.id for s in p.steps][:2] == ["s01-rome", "s02-rome"]
    assert p.steps[-1].id == "s12-rome"


def test_registry_order_does_not_matter(smol):
    reg = fake_registry()
    reversed_reg = dict(reversed(list(reg.items())))
    spec = make_spec(*many(3))
    a = plan(spec, smol, backends=reg).to_json()
    assert a == plan(spec, smol, backends=reversed_reg).to_json()
