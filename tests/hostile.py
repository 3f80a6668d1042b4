"""Hostile inputs for the CLI: a sandbox with bait, spec and path generators, a bounded runner.

Contents:
    SECRET        a string that must never appear in kmec's output
    Sandbox       a folder tree with a repository, bait outside it (secret files,
                  symlinks to kernel files, a FIFO) and a snapshot of every file
    Outcome       what one CLI call did (exit code, output, seconds, crash)
    run_cli()     run ``kmec`` in-process with its output captured and a time limit
    paths()       hypothesis strategy: hostile paths for include / subjects / outputs
    specs()       hypothesis strategy: specs mixing valid statements with hostile ones
    commands()    hypothesis strategy: (spec text, argv) pairs to try
    mutate_manifest()  a random change to an artifact manifest (for the tamper campaign)

Used by ``tests/test_security_fuzz.py`` (a short run in the suite) and
``benchmarks/fuzz_cli.py`` (the long campaign). It is not a test module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

SECRET = "kmec-hostile-secret-9c2e"
SPEC_NAME = "spec.kmec"

GOOD_RELATION = ('relation capital {\n  prompt "The capital of {{ subject }} is"\n'
                 '  paraphrase "{{ subject }}\'s capital city is"\n}\n')
GOOD_EDIT = 'edit kz { subject "Kazakhstan" relation capital "Astana" -> "Nur-Sultan" }\n'


class Sandbox:
    """``root/repo`` (a repository with ``specs/``) and bait outside and inside it.

    Bait: ``root/outside/secret.kmec`` and ``secret.txt`` (hold :data:`SECRET`),
    ``repo/specs/.env`` (hidden, holds it), links from ``specs/`` to the
    outside files, to ``/proc/self/environ`` and ``/dev/zero``, a FIFO, a
    folder named like a file, and a user folder ``repo/mine`` that no command
    may touch.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = root / "repo"
        self.specs = self.repo / "specs"
        self.outside = root / "outside"
        for d in (self.repo / ".git", self.specs, self.outside, self.repo / "mine" / "sub"):
            d.mkdir(parents=True, exist_ok=True)
        (self.outside / "secret.kmec").write_text(f"secret {SECRET}\n")
        (self.outside / "secret.txt").write_text(f"{SECRET}\n")
        (self.specs / ".env").write_text(f"TOKEN={SECRET}\n")
        (self.specs / "countries.txt").write_text("France\nPeru\n")
        (self.specs / "part.kmec").write_text(GOOD_RELATION.replace("capital", "part"))
        (self.repo / "mine" / "sub" / "thesis.tex").write_text("years of work\n")
        (self.repo / "notes.txt").write_text("keep\n")
        links = {"up.kmec": self.outside / "secret.kmec", "up.txt": self.outside / "secret.txt",
                 "environ.kmec": Path("/proc/self/environ"), "zero.kmec": Path("/dev/zero"),
                 "zero.txt": Path("/dev/zero"), "env.kmec": self.specs / ".env"}
        for name, target in links.items():
            link = self.specs / name
            if not link.is_symlink():
                link.symlink_to(target)
        if not (self.specs / "fifo.kmec").exists():
            os.mkfifo(self.specs / "fifo.kmec")
            os.mkfifo(self.specs / "fifo.txt")
        (self.specs / "dir.kmec").mkdir(exist_ok=True)
        self.protected = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every path under root (links not followed) -> (size, mtime_ns)."""
        out: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st_ = os.lstat(p)
                out[os.path.relpath(p, self.root)] = (st_.st_size if not os.path.isdir(p) else 0,
                                                     st_.st_mtime_ns if os.path.isfile(p) and
                                                     not os.path.islink(p) else 0)
        return out

    def touched(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """Protected paths that changed or vanished (``allowed`` prefixes excepted)."""
        now = self.snapshot()
        return [p for p, v in self.protected.items()
                if now.get(p) != v and not p.startswith(allowed)
                and not p.startswith(os.path.join("repo", "specs", SPEC_NAME))]


@dataclass
class Outcome:
    """What one CLI call did."""

    code: int | None
    output: str
    seconds: float
    crash: str | None = None  # an exception other than SystemExit (a traceback)
    hung: bool = False


def run_cli(argv: list[str], *, cwd: Path, timeout: float = 60.0) -> Outcome:
    """Run ``kmec argv`` in-process in ``cwd``; capture stdout, stderr and the kmec log."""
    from kmec.cli import main

    buf = io.StringIO()
    result: dict[str, Any] = {}
    handler = logging.StreamHandler(buf)

    def target() -> None:
        try:
            main(argv)
        except SystemExit as e:
            result["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except BaseException as e:  # noqa: BLE001 -- this is what the campaign counts
            result["crash"] = f"{type(e).__name__}: {e}"

    old = Path.cwd()
    logging.getLogger().addHandler(handler)
    t0 = time.perf_counter()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            worker = threading.Thread(target=target, daemon=True)
            worker.start()
            worker.join(timeout)
    finally:
        os.chdir(old)
        logging.getLogger().removeHandler(handler)
    hung = worker.is_alive()
    return Outcome(result.get("code"), buf.getvalue(), time.perf_counter() - t0,
                   result.get("crash"), hung)


# ---------------------------------------------------------------- strategies

_BAIT = ["/proc/self/environ", "/etc/passwd", "/dev/zero", "../../outside/secret.kmec",
         "../../outside/secret.txt", "../../../../../../../../etc/passwd", ".env", "./.env",
         "up.kmec", "up.txt", "environ.kmec", "zero.kmec", "zero.txt", "env.kmec", "fifo.kmec",
         "fifo.txt", "dir.kmec", "part.kmec", "countries.txt", "missing.kmec", "~/.bashrc",
         "sub/../part.kmec", "specs/../../outside/secret.kmec", "", " ", "a\x00b", "x" * 300,
         "../specs/part.kmec", "/", ".", "..", "../.git/config", "spec.kmec"]
_OUTPUTS = ["build", "out/build", ".", "..", "/", "/proc/x", "/dev/null", "mine", "notes.txt",
            "notes.txt/build", "specs", "specs/spec.kmec", "../outside", "repo", "~",
            "mine/sub", "fresh", "/sys/kernel", ".git"]
_TEMPLATES = ["{{ subject }}", "{{ 9**(9**10) }}", "{{ 'a' * 10**10 }}",
              "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
              "{{ range(5)|list }}", "{{ lipsum() }}", "{{ subject.__class__.__mro__ }}",
              "{{ cycler.__init__.__globals__.os.environ }}", "{{ subject | upper }}",
              "{% raw %}{{{% endraw %}", "{{ subject ~ subject ~ subject }}", "{{", "{%", "{#",
              "{{ subject | replace('a', 'bbbbbbbbbbbbbbbbbbbb') }}", "{{ config }}",
              "{{ self }}", "{% include '/etc/passwd' %}", "{% import 'x' as y %}"]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\x00", "\\u0000") + '"'


def paths() -> st.SearchStrategy[str]:
    """Hostile and ordinary paths, and random combinations of their parts."""
    parts = st.sampled_from(["..", ".", "specs", "outside", "secret.kmec", ".env", "proc",
                             "self", "environ", "part.kmec", "x.kmec", "countries.txt", ""])
    joined = st.lists(parts, min_size=1, max_size=8).map("/".join)
    return st.one_of(st.sampled_from(_BAIT), joined, joined.map(lambda p: "/" + p),
                     st.text(max_size=12))


def _template() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(_TEMPLATES),
                     st.lists(st.sampled_from(_TEMPLATES), min_size=1, max_size=3).map(" ".join))


def _statement() -> st.SearchStrategy[str]:
    return st.one_of(
        paths().map(lambda p: f"include {_quote(p)}\n"),
        paths().map(lambda p: 'relation r {\n  prompt "{{ subject }} is"\n  subjects from '
                    f"{_quote(p)}\n}}\n"),
        _template().map(lambda t: f"relation t {{\n  prompt {_quote(t + ' {{ subject }}')}\n}}\n"
                        "edit te { subject \"A\" relation t -> \"B\" }\n"),
        _template().map(lambda t: "edit pe { prompt \"Who won?\" -> \"France\" portability "
                        f"{_quote(t)} -> \"x\" }}\n"),
        st.sampled_from([GOOD_RELATION, GOOD_EDIT, "claim efficacy >= 0.9\n",
                         "claim locality >= 0.9 sample 3 neighbours of capital kl 0.1\n",
                         'model "nowhere-model"\n', "seed 3\n", "order sequence\n"]),
        st.text(max_size=40),
    )


def specs() -> st.SearchStrategy[str]:
    """Spec texts: valid statements interleaved with hostile ones."""
    return st.lists(_statement(), min_size=1, max_size=6).map("".join)


def commands() -> st.SearchStrategy[tuple[str, list[str]]]:
    """``(spec text, argv)``; argv names the spec as ``specs/spec.kmec`` (run in the repo)."""
    spec = f"specs/{SPEC_NAME}"
    no_model = ["--model", "./no-such-model-folder"]
    argv = st.one_of(
        st.just(["check", spec]), st.just(["check", "specs"]), st.just(["fmt", "--check", spec]),
        st.just(["plan", spec, "--model", "./no-such-model-folder"]),
        st.sampled_from(_OUTPUTS).map(lambda o: ["compile", spec, "-o", o, *no_model]),
        st.sampled_from(_OUTPUTS).map(lambda o: ["compile", spec, "-o", o, "--force",
                                                 *no_model]),
        st.sampled_from(_OUTPUTS).map(lambda o: ["apply", "build", "--out", o]),
        st.sampled_from(_OUTPUTS).map(lambda o: ["revert", "mine", "--out", o]),
        st.sampled_from(_OUTPUTS).map(lambda o: ["verify", "build", "--report-dir", o]),
        paths().map(lambda p: ["check", p]),
    )
    return st.tuples(specs(), argv)


# ---------------------------------------------------------------- manifests

def mutate_manifest(raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One random change to a manifest's fields (returns a new dict)."""
    import copy

    m = copy.deepcopy(raw)
    payload = m["payloads"][rng.randrange(len(m["payloads"]))] if m["payloads"] else m
    choices: list[Any] = [
        ("scale", rng.choice([1.6, 0.0, -1.0, 1e30, "1", None, float("nan")])),
        ("param", rng.choice(["model.layers.0.mlp.down_proj.weight", "lm_head.weight", "",
                              "../../etc/passwd", None, 3])),
        ("id", rng.choice(["../p0000", "p0001", "p", "p00000000000", "", "p0000/x", None])),
        ("step", rng.choice(["s99", "", None, "s00-rome "])),
        ("shape", rng.choice([[1, 1], [], [32, 2048, 1], "x"])),
        ("rank", rng.choice([0, 2, -1, None, 1.5])),
        ("kind", rng.choice(["dense", "memory", "low_rank", "other"])),
        ("layer", rng.choice([0, 5, -1, None])),
        ("site", rng.choice(["model.layers.1.mlp", None, ""])),
        ("tensors", rng.choice([{}, {"x.u": "0" * 64}, None])),
        ("meta", rng.choice([{"a": 1}, None, []])),
    ]
    top: list[Any] = [
        ("weight_layout", rng.choice(["in_out", "diagonal", None])),
        ("plan_hash", rng.choice(["0" * 64, "", None])),
        ("base_fingerprint", rng.choice(["0" * 64, "", None])),
        ("format", rng.choice(["kmec-artifact/1", "kmec-artifact/3", "x", None])),
        ("kmec_version", rng.choice(["9.9.9", None])),
        ("sha256", rng.choice(["0" * 64, "", None])),
        ("fields", rng.choice([{}, None, {"x": "y"}])),
        ("payloads", rng.choice([[], None, m["payloads"] * 2])),
        ("extra", 1),
    ]
    key, value = rng.choice(choices) if rng.random() < 0.7 and payload is not m \
        else rng.choice(top)
    target = payload if key in dict(choices) else m
    if value is None and rng.random() < 0.5:
        target.pop(key, None)
    else:
        target[key] = value
    if rng.random() < 0.3 and isinstance(m.get("payloads"), list) and m["payloads"] \
            and isinstance(m["payloads"][0], dict):  # a tensor hash or two changed as well
        t = m["payloads"][0].get("tensors")
        if isinstance(t, dict) and t:
            k = rng.choice(sorted(t))
            t[k] = ("f" * 64) if rng.random() < 0.5 else t[k][:-1] + "0"
    return m
