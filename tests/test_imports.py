"""The import rule: every stage imports only from stages below it (issue #9's one-way house).

Every module under ``kmec/`` is parsed (imports inside functions included) and
each ``kmec`` import is checked against the layer table below. A violation
fails naming ``file:line`` and the rule it breaks.

The order, bottom to top, and why it differs from the first sketch:

- ``errors``, ``_version``, ``progress`` import nothing of kmec; ``hashing``
  (atomic writes raise KmecError) and ``outputs`` (what kmec may overwrite)
  sit just above them.
- ``spec``, ``models``, ``kernels`` are independent of each other.
- ``grammar`` → ``planner`` → ``stats``: the statistics engine consumes the
  planner's StatsRequest. ``data`` (the dataset importers) renders specs with
  the grammar and sits below the backends, whose MEND editor trains on the
  same release files (``backends/mend/records.py`` reading ``kmec.data`` is
  downward, not a back-up import).
- ``artifacts`` sits *below* ``backends``: it owns what an edit is (payload
  types, formats, apply/revert, the memory runtime); backends import their
  payload types and ``temporarily_added`` from it, and it imports no backend.
- ``compile`` (execute + step cache) → ``verify`` → ``pipeline`` (the
  workflows that call both) → ``bench`` and ``diff`` (which reads specs, builds and
  reports) and ``api`` (``kmec.edit``) → the CLI and the package root.

Extra rules: the verifier imports neither the backends nor the compiler; the
planner sees models only through ``ModelFacts`` and the adapters table (it
never loads one); no stage imports the package root ``kmec`` (the version
lives in ``kmec._version``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kmec"

LEVELS: tuple[tuple[str, ...], ...] = (
    ("errors", "_version", "progress"),
    ("hashing", "outputs"),
    ("spec", "models", "kernels"),
    ("grammar",),
    ("planner",),
    ("stats",),
    ("data",),
    ("artifacts",),
    ("backends",),
    ("compile",),
    ("verify",),
    ("pipeline",),
    ("bench", "diff", "api"),  # api: kmec.edit, the one-call workflow over the pipeline
    ("cli", "kmec"),  # "kmec": the package root (kmec/__init__.py)
    ("__main__",),
)
LEVEL = {group: i for i, groups in enumerate(LEVELS) for group in groups}

# (importing group, imported module prefix, why)
FORBIDDEN = (
    ("verify", "kmec.backends", "the verifier judges edits without knowing how they were made"),
    ("verify", "kmec.compile", "the verifier reads builds through kmec.artifacts.build"),
    ("planner", "kmec.models.load", "the planner sees ModelFacts, never a loaded model"),
    ("planner", "kmec.models.hooks", "the planner sees ModelFacts, never a loaded model"),
    ("planner", "kmec.models.trace", "the planner sees ModelFacts, never a loaded model"),
)


def group_of(module: str) -> str:
    """``kmec.backends.rome`` -> ``backends``; the package root -> ``kmec``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kmec"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kmec_imports(source: str, module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of kmec in ``source`` (any depth)."""
    out = []
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "kmec"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] == "kmec":
                if target == "kmec":  # `from kmec import x`: x may be a submodule
                    out += [(node.lineno, f"kmec.{a.name}") if f"kmec.{a.name}" in MODULES
                            else (node.lineno, "kmec") for a in node.names]
                else:
                    out.append((node.lineno, target))
    return out


def violations(module: str, source: str, file: str) -> list[str]:
    """Every import in ``source`` (module ``module``) that breaks a rule, as ``file:line: ...``."""
    mine = group_of(module)
    found = []
    for line, target in kmec_imports(source, module):
        theirs = group_of(target)
        where = f"{file}:{line}: {module} imports {target}"
        if theirs == "kmec" and mine != "kmec":
            found.append(f"{where}: no stage imports the package root (use kmec._version, ...)")
            continue
        if theirs == mine:
            continue
        if theirs not in LEVEL or mine not in LEVEL:
            found.append(f"{where}: {theirs if theirs not in LEVEL else mine} is not in the "
                         "layer table (add it to tests/test_imports.py)")
            continue
        if LEVEL[theirs] >= LEVEL[mine]:
            rel = "beside" if LEVEL[theirs] == LEVEL[mine] else "above"
            found.append(f"{where}: {theirs} sits {rel} {mine} (a stage imports only from "
                         "stages below it)")
        for group, prefix, why in FORBIDDEN:
            if mine == group and (target == prefix or target.startswith(prefix + ".")):
                found.append(f"{where}: {why}")
    return found


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def test_every_group_is_in_the_table():
    groups = {group_of(m) for m in MODULES}
    assert groups <= set(LEVEL), sorted(groups - set(LEVEL))


def test_imports_flow_downstream():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += violations(module_name(path), path.read_text(encoding="utf-8"),
                               str(path.relative_to(ROOT)))
    assert not problems, "\n".join(problems)


# The eight back-up imports issue #9 found, each as a synthetic module: the rule catches them.
BACK_UP = [
    ("kmec.models.trace", "from kmec.backends.keys import subject_position, target_text",
     "backends sits above models"),
    ("kmec.planner.facts_io", "def f():\n    from kmec.models.load import load_model",
     "the planner sees ModelFacts, never a loaded model"),
    ("kmec.planner", "def plan():\n    from kmec.backends import BACKENDS",
     "backends sits above planner"),
    ("kmec.artifacts.format", "from kmec.backends.base import LowRank",
     "backends sits above artifacts"),
    ("kmec.artifacts.apply", "def f():\n    from kmec.backends.memory_hook import install_memory",
     "backends sits above artifacts"),
    ("kmec.verify.build", "def f():\n    from kmec.compile import read_build",
     "the verifier reads builds through kmec.artifacts.build"),
    ("kmec.compile", "from kmec import __version__", "no stage imports the package root"),
    ("kmec.stats.engine", "from kmec.pipeline import compile_spec",
     "pipeline sits above stats"),
]


@pytest.mark.parametrize("module, source, rule", BACK_UP, ids=[b[0] for b in BACK_UP])
def test_the_rule_catches_back_up_imports(module, source, rule):
    found = violations(module, source, "synthetic.py")
    assert found and any(rule in f for f in found), found
    assert found[0].startswith("synthetic.py:")


def test_downward_and_same_stage_imports_pass():
    ok = ("from kmec.artifacts.payloads import LowRank\nfrom kmec.backends.keys import "
          "compute_keys\nfrom kmec.models.hooks import Trace\n")
    assert violations("kmec.backends.rome", ok, "x.py") == []
    assert violations("kmec.backends.mend.records", "from kmec.data import import_file",
                      "x.py") == []


IN_PLACE = {"add_", "copy_", "sub_", "mul_", "div_", "fill_", "zero_", "index_put_",
            "index_add_", "masked_fill_", "set_", "addmm_", "addr_", "normal_", "uniform_"}
PARAMETER_SOURCES = ("named_parameters", "get_parameter", "parameters", "state_dict")


def _mentions_parameters(node: ast.AST, bound: set[str]) -> bool:
    """Whether ``node`` reads a model parameter: a parameter accessor, a ``.weight`` /
    ``.bias`` attribute, or a name bound to one (a ``params`` table included)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in (*PARAMETER_SOURCES, "weight", "bias",
                                                           *bound):
            return True
        if isinstance(sub, ast.Name) and sub.id in bound:
            return True
    return False


def parameter_writes(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of in-place writes to model parameters in ``source``: an in-place
    tensor method called on a parameter (or on a name bound to one in the same function),
    or an assignment to a parameter's ``.data``."""
    out = []
    tree = ast.parse(source)
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                           ast.AsyncFunctionDef))]
    for fn in scopes or [tree]:
        bound: set[str] = set()
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None and \
                    _mentions_parameters(node.value, bound):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound |= {t.id for t in targets if isinstance(t, ast.Name)}
                bound |= {t.attr for t in targets if isinstance(t, ast.Attribute)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in IN_PLACE and _mentions_parameters(node.func.value, bound):
                out.append((node.lineno, ast.unparse(node)[:100]))
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Attribute) and t.attr == "data" and
                    _mentions_parameters(t.value, bound) for t in node.targets):
                out.append((node.lineno, ast.unparse(node)[:100]))
    return sorted(set(out))


def test_only_the_artifacts_package_writes_parameters():
    """No code outside kmec/artifacts/ writes a model parameter (apply is the one writer)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "artifacts"):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line}: {text}"
                      for line, text in parameter_writes(path.read_text(encoding="utf-8"))]
    assert not offenders, "\n".join(offenders)


def test_the_writer_check_sees_the_old_second_writer():
    """``backends/linalg.py``'s ``temporarily_added`` (before it moved) would be caught."""
    old = (
        "class temporarily_added:\n"
        "    def __init__(self, model, layout):\n"
        "        self.params = dict(model.named_parameters())\n"
        "    def add(self, name, u, v):\n"
        "        w = self.params[name]\n"
        "        w.add_(u @ v.T)\n")
    assert [line for line, _ in parameter_writes(old)] == [6]
    assert parameter_writes("def f(model):\n    model.get_parameter('x').copy_(y)\n")
    assert parameter_writes("def f(m):\n    m.lm_head.weight.data = z\n")
    assert parameter_writes("def f(delta):\n    delta.mul_(2)\n") == []  # its own tensor
