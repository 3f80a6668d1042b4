"""Campaign: hostile specs, paths and tampered manifests against the kmec CLI (issue #19).

Run: .venv/bin/python benchmarks/fuzz_cli.py [--specs 10000] [--manifests 1000] [--seed 0]

Two parts, each counted; every count of a failure must be 0:

1. **Specs.** ``--specs`` spec texts, half generated from hostile statements
   (includes and ``subjects from`` of absolute paths, ``..`` escapes, hidden
   files, links out of the repository and to ``/proc/self/environ`` or
   ``/dev/zero``, FIFOs, folders; templates that loop, compute or reach for
   internals; portability prompts with markup) and half mutated from the
   example specs (characters and lines deleted, duplicated, swapped, bait
   inserted). Each is run in-process with one command (``check``, ``fmt``,
   ``plan``, ``compile``/``apply``/``revert``/``verify`` with hostile output
   paths) inside a sandbox (``tests/hostile.py``). Counted: **tracebacks**
   (an exception other than the CLI's exit), **hangs** (no exit within 60
   s), **leaks** (a secret planted in files outside the repository, in its
   ``.env`` and in the environment appears in the output), **touched** (a
   file the command was not asked to write changed or vanished), and exit
   codes other than 0/1/2.
2. **Manifests.** A build directory is written (a plan whose one step may
   change one parameter, its spec, an artifact, build.json); ``--manifests``
   times its manifest gets a random change (a field's value or type, a
   missing or extra field, a tensor hash), resealed with its own sha256 in a
   third of the cases (a forger who recomputes it), and in a tenth of the
   cases a byte of the tensor file is flipped instead. The build is then
   read as ``kmec verify``/``apply``/``audit`` read it
   (:func:`kmec.artifacts.build.load_checked`). Counted: **accepted** (a build whose
   manifest means something else than the original was read without
   refusal) and **tracebacks** (a refusal that is not a KmecError).

The last line is ``specs=N tracebacks=T hangs=H leaks=L touched=X bad_exit=B
manifests=M accepted=A manifest_tracebacks=U``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hostile import (
    _BAIT,
    _OUTPUTS,
    _TEMPLATES,
    GOOD_EDIT,
    GOOD_RELATION,
    SECRET,
    SPEC_NAME,
    Sandbox,
    _quote,
    mutate_manifest,
    run_cli,
)

SEEDS = [p.read_text() for p in sorted((ROOT / "specs" / "examples").glob("*.kmec"))]


def hostile_statement(rng: random.Random) -> str:
    path = rng.choice(_BAIT) if rng.random() < 0.8 else "/".join(
        rng.choice(["..", ".", "specs", "outside", "secret.kmec", ".env", "proc", "environ"])
        for _ in range(rng.randint(1, 6)))
    template = " ".join(rng.choice(_TEMPLATES) for _ in range(rng.randint(1, 2)))
    return rng.choice([
        f"include {_quote(path)}\n",
        f'relation r {{\n  prompt "{{{{ subject }}}} is"\n  subjects from {_quote(path)}\n}}\n',
        f"relation t {{\n  prompt {_quote(template + ' {{ subject }}')}\n}}\n"
        'edit te { subject "A" relation t -> "B" }\n',
        f'edit pe {{ prompt "Who won?" -> "France" portability {_quote(template)} -> "x" }}\n',
        GOOD_RELATION, GOOD_EDIT, "claim efficacy >= 0.9\n",
        "claim locality >= 0.9 sample 3 neighbours of capital kl 0.1\n",
    ])


def generated(rng: random.Random) -> str:
    return "".join(hostile_statement(rng) for _ in range(rng.randint(1, 6)))


def mutated(rng: random.Random) -> str:
    lines = rng.choice(SEEDS).splitlines(keepends=True)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        i = rng.randrange(len(lines)) if lines else 0
        if op == 0 and lines:
            del lines[i]
        elif op == 1 and lines:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 2:
            lines.insert(i, hostile_statement(rng))
        elif op == 3 and lines:
            s = lines[i]
            j = rng.randrange(len(s) + 1)
            lines[i] = s[:j] + rng.choice(['"', "{", "}", "{{", "..", "/", "\\", "\x00", "#"]) + s[j:]
        elif lines:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


def argv_for(rng: random.Random) -> list[str]:
    spec = f"specs/{SPEC_NAME}"
    out = rng.choice(_OUTPUTS)
    no_model = ["--model", "./no-such-model-folder"]
    return rng.choice([
        ["check", spec], ["check", spec], ["check", "specs"], ["fmt", "--check", spec],
        ["plan", spec, *no_model], ["compile", spec, "-o", out, *no_model],
        ["compile", spec, "-o", out, "--force", *no_model], ["apply", "build", "--out", out],
        ["revert", "mine", "--out", out], ["verify", "build", "--report-dir", out],
        ["check", rng.choice(_BAIT) or "x"],
    ])


def named_a_spec(argv: list[str], cwd: Path, box: Sandbox) -> bool:
    """``kmec check FILE`` on a regular ``*.kmec`` file, no link involved, or ``kmec check
    DIR`` on a folder holding the bait spec ``outside/secret.kmec``: the user asked to see
    those specs, so their lines may be quoted (not a leak; a link or any other file would be)."""
    if argv[0] != "check" or len(argv) != 2:
        return False
    p = cwd / argv[1]
    try:
        if p.is_dir():
            bait = os.path.realpath(box.outside / "secret.kmec")
            return bait.startswith(os.path.realpath(p).rstrip("/") + "/")
        return p.name.endswith(".kmec") and p.is_file() and \
            os.path.realpath(p) == os.path.abspath(p)
    except (OSError, ValueError):
        return False


def spec_campaign(n: int, seed: int, box: Sandbox, report_every: int = 500) -> Counter:
    rng = random.Random(seed)
    counts: Counter = Counter()
    examples: dict[str, str] = {}
    t0 = time.perf_counter()
    for i in range(n):
        text = generated(rng) if i % 2 == 0 else mutated(rng)
        argv = argv_for(rng)
        (box.specs / SPEC_NAME).write_text(text)
        out = run_cli(argv, cwd=box.repo, timeout=60)
        counts["specs"] += 1
        problems = {"tracebacks": out.crash is not None, "hangs": out.hung,
                    "leaks": SECRET in out.output and not named_a_spec(argv, box.repo, box),
                    "bad_exit": not out.hung and out.crash is None and out.code not in (0, 1, 2)}
        touched = box.touched(allowed=("repo/build", "repo/out", "repo/fresh"))
        problems["touched"] = bool(touched)
        for key, bad in problems.items():
            if bad:
                counts[key] += 1
                examples.setdefault(key, f"{argv} {out.crash or touched or out.output[-300:]}"
                                    f"\n--- spec ---\n{text[:600]}")
        for kept in ("build", "out", "fresh"):  # outputs a command may write: start clean
            p = box.repo / kept
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
        box.protected = box.snapshot()
        counts[f"exit_{out.code}"] += 1
        if (i + 1) % report_every == 0:
            print(f"  {i + 1} specs, {time.perf_counter() - t0:.0f} s: "
                  f"{dict(sorted(counts.items()))}", flush=True)
    for key, text in examples.items():
        print(f"first {key}: {text}", flush=True)
    return counts


def _write_build(folder: Path) -> Path:
    import torch

    from kmec.artifacts import build_artifact, save_artifact
    from kmec.artifacts.payloads import LowRank
    from kmec.grammar import parse
    from kmec.hashing import canonical_json, spec_hash
    from kmec.planner.model import EditRequest, Plan, Step

    spec = parse(GOOD_RELATION + GOOD_EDIT)
    param = "model.layers.1.mlp.down_proj.weight"
    req = EditRequest(name="kz", prompt="The capital of Kazakhstan is", subject="Kazakhstan",
                      target_new="Nur-Sultan")
    plan = Plan(kmec_version="0.1.0", spec_hash=spec_hash(spec), model="tiny",
                model_fingerprint="f" * 64, model_arch="LlamaForCausalLM", seed=0,
                order="batch", steps=(Step(id="s00-rome", backend="rome", edits=(req,),
                                           layers=(1,), writes=(param,)),))
    g = torch.Generator().manual_seed(0)
    art = build_artifact([("s00-rome", [LowRank(param, torch.randn(32, 1, generator=g),
                                                torch.randn(64, 1, generator=g))])],
                         base_model="tiny", base_fingerprint="f" * 64,
                         base_arch="LlamaForCausalLM", weight_layout="out_in",
                         plan_hash=plan.sha256)
    build = folder / "build"
    build.mkdir()
    (build / "plan.json").write_text(plan.to_json())
    (build / "spec.json").write_text(canonical_json(spec.model_dump(mode="json")))
    (build / "build.json").write_text(canonical_json({
        "spec_path": "spec.kmec", "model": "tiny", "plan_hash": plan.sha256,
        "kmec_version": "0.1.0", "artifact_sha256": art.manifest.sha256}))
    save_artifact(art, build / "artifact")
    return build


def _means(raw: object) -> object:
    """What a manifest says: its validated model (a field left at its default, or written
    with another JSON spelling of the same value, says the same), else its raw JSON."""
    from kmec.artifacts import Manifest

    try:
        return Manifest.model_validate(raw).model_dump(mode="json")
    except Exception:  # noqa: BLE001 -- invalid: compare as written
        return raw


def _difference(original: dict, manifest: Path) -> str:
    try:
        now = json.loads(manifest.read_text())
    except ValueError:
        return "manifest unreadable"
    if now == original:
        return "tensor file changed"
    keys = [k for k in original.keys() | now.keys() if original.get(k) != now.get(k)]
    return "; ".join(f"{k}: {str(original.get(k))[:120]} -> {str(now.get(k))[:120]}"
                     for k in sorted(keys))


def manifest_campaign(n: int, seed: int, folder: Path) -> Counter:
    from kmec.artifacts import Manifest
    from kmec.artifacts.build import load_checked
    from kmec.errors import KmecError

    rng = random.Random(seed)
    build = _write_build(folder)
    manifest = build / "artifact" / "manifest.json"
    tensors = build / "artifact" / "payloads.safetensors"
    original_text, original_bytes = manifest.read_text(), tensors.read_bytes()
    original = json.loads(original_text)
    load_checked(build)  # the untouched build is accepted
    counts: Counter = Counter()
    for _ in range(n):
        counts["manifests"] += 1
        if rng.random() < 0.1:  # flip one byte of the tensor file instead
            data = bytearray(original_bytes)
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
            tensors.write_bytes(bytes(data))
            changed = bytes(data) != original_bytes
        else:
            raw = mutate_manifest(original, rng)
            if rng.random() < 0.33:
                with contextlib.suppress(Exception):  # an invalid manifest cannot be resealed
                    raw = Manifest.model_validate(raw).sealed().model_dump(mode="json")
            manifest.write_text(json.dumps(raw, allow_nan=True))
            changed = _means(raw) != _means(original)
        try:
            load_checked(build)
            if changed:
                counts["accepted"] += 1
                print(f"accepted a tampered build: {_difference(original, manifest)}", flush=True)
        except KmecError:
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001 -- a traceback in the CLI
            counts["manifest_tracebacks"] += 1
            print(f"traceback: {type(e).__name__}: {e}", flush=True)
        manifest.write_text(original_text)
        tensors.write_bytes(original_bytes)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", type=int, default=10_000)
    ap.add_argument("--manifests", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ["KMEC_HOSTILE_SECRET"] = SECRET  # bait in the environment too
    os.environ.setdefault("KMEC_HOME", tempfile.mkdtemp(prefix="kmec-fuzz-home-"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kmec-fuzz-") as tmp:
        box = Sandbox(Path(tmp) / "box")
        specs = spec_campaign(args.specs, args.seed, box)
        t1 = time.perf_counter()
        manifests = manifest_campaign(args.manifests, args.seed, Path(tmp))
    t2 = time.perf_counter()
    print(f"spec campaign {t1 - t0:.0f} s, manifest campaign {t2 - t1:.0f} s; exit codes: "
          + ", ".join(f"{k[5:]}: {v}" for k, v in sorted(specs.items()) if k.startswith("exit_")))
    print(f"specs={specs['specs']} tracebacks={specs['tracebacks']} hangs={specs['hangs']} "
          f"leaks={specs['leaks']} touched={specs['touched']} bad_exit={specs['bad_exit']} "
          f"manifests={manifests['manifests']} accepted={manifests['accepted']} "
          f"manifest_tracebacks={manifests['manifest_tracebacks']}")


if __name__ == "__main__":
    main()
