"""``kmec bench``: compile and verify one spec with several methods, one table out.

Contents:
    MODES          ``single`` | ``batch`` | ``sequence``
    BenchRow       one method's scores, time per edit and peak memory
    BenchResult    the rows plus what they were measured on (JSON-serialisable)
    bench()        run the comparison in one process on one loaded model
    render_markdown()  the table as GitHub Markdown

Every method runs on the same model object, loaded once, with the step cache
off (a cached step would time nothing). Per method:

* ``batch``: the spec as written, ``method`` set to the method, ``order
  batch``; one plan, one artifact, one verification.
* ``sequence``: the same with ``order sequence`` (each edit its own step,
  each step compiled on the model carrying the earlier ones).
* ``single``: each edit alone on the unedited model (a spec holding just
  that edit), verified, then reverted; scores are means over the edits.

What the compiler is shown. By default (``prompts="held out"``) each method
compiles a *compile view* of the spec (:func:`compile_view`) that keeps
every prompt bench scores out of compilation: the relations' paraphrases,
the edits' ``scope`` and ``preserve`` prompts, the neighbours of locality
claims (no protected keys) and the reverse questions (no inverse edits). The
full spec is then verified, so generality, locality and reversal are scored
on prompts the method never saw — the protocol of the research benchmarks,
and the only fair one across methods that can and cannot use declared
prompts. ``prompts="declared"`` compiles the spec as written (what ``kmec
compile`` does: the scores then show that the contract holds). Either way
the result and its table say which it was.

Scores are the verifier's claim scores (:mod:`kmec.verify`), grouped by
metric (efficacy, generality, locality, portability, reversal, retention)
and averaged over the edits that have the claim; ``pass`` counts claims that
hold. Time per edit is compile time (statistics excluded: they are computed
or loaded once before timing, and reported separately) divided by the number
of edit requests. Peak memory is the highest resident set size of the
process while compiling, minus the resident size just before (plus the CUDA
allocator's peak on a GPU), sampled every 20 ms.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from kmec._version import __version__
from kmec.errors import KmecError, PlanError, did_you_mean
from kmec.progress import Progress

Mode = Literal["single", "batch", "sequence"]
Prompts = Literal["held out", "declared"]
MODES: tuple[Mode, ...] = ("single", "batch", "sequence")
METRICS = ("efficacy", "generality", "locality", "portability", "reversal", "retention")


class BenchRow(BaseModel):
    """One method's results (``None``: the spec claims nothing for that metric)."""

    model_config = ConfigDict(frozen=True)

    method: str
    edits: int
    scores: dict[str, float | None]
    passed: int
    checks: int
    compile_s: float
    s_per_edit: float
    verify_s: float
    peak_mb: float
    error: str | None = None


class BenchResult(BaseModel):
    """A benchmark table and its provenance."""

    model_config = ConfigDict(frozen=True)

    kmec_version: str
    spec: str
    model: str
    fingerprint: str
    mode: Mode
    edits: int
    stats_s: float
    rows: tuple[BenchRow, ...]
    prompts: Prompts = "declared"

    @property
    def prompts_note(self) -> str:
        """One sentence on what the compiler was shown (printed under every table)."""
        if self.prompts == "held out":
            return ("scored prompts were kept out of compilation: each method saw only the edit "
                    "prompts, never the paraphrases, scope, preserve, neighbour or reverse "
                    "prompts it is scored on (rome also trains on wordings it draws from the "
                    "model itself: value.wordings)")
        return ("the spec was compiled as written: its declared paraphrases, scope, preserve "
                "and neighbour prompts were shown to the compiler, so their scores show the "
                "contract holds, not generalisation")


class _PeakRss:
    """Highest resident set size of this process while the block runs (MB above the start)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> Self:
        self.start = self.peak = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def extra_mb(self) -> float:
        return max(0.0, self.peak - self.start)


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def parse_methods(text: str, known: Sequence[str]) -> tuple[str, ...]:
    """``"rome,memit"`` -> ``("rome", "memit")``, refusing unknown or repeated names.

    >>> parse_methods("rome, memit", ["rome", "memit", "ft"])
    ('rome', 'memit')
    >>> parse_methods("rom", ["rome", "memit"])
    Traceback (most recent call last):
    kmec.errors.PlanError: unknown method 'rom' (registered: memit, rome)
      hint: did you mean 'rome'?
    """
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise PlanError("no methods given", hint="e.g. --methods rome,memit")
    for m in names:
        if m not in known:
            raise PlanError(f"unknown method {m!r} (registered: {', '.join(sorted(known))})",
                            hint=did_you_mean(m, known))
    if len(set(names)) != len(names):
        raise PlanError(f"a method is listed twice in {text!r}")
    return tuple(names)


def compile_view(spec: Any) -> Any:
    """``spec`` without the prompts bench scores: no relation paraphrases, no edit
    ``scope``/``preserve``, no ``expect reversal`` (no inverse edit), no locality claims
    (no protected neighbours). The edits themselves (subject, relation, prompt, targets)
    are unchanged, so the full spec verifies the compiled plan."""
    return spec.model_copy(update={
        "relations": tuple(r.model_copy(update={"paraphrases": ()}) for r in spec.relations),
        "edits": tuple(e.model_copy(update={"scope": (), "preserve": (),
                                            "expect_reversal": False}) for e in spec.edits),
        "claims": tuple(c for c in spec.claims if c.metric != "locality")})


def _with_method(spec: Any, method: str, order: str) -> Any:
    return spec.model_copy(update={"method": spec.method.model_copy(update={"method": method}),
                                   "order": order})


def _metric_scores(report: Any) -> tuple[dict[str, list[float]], int, int]:
    by_metric: dict[str, list[float]] = {}
    passed = checks = 0
    for c in report.claims:
        if c.status == "n/a":
            continue
        checks += 1
        passed += c.status == "pass"
        if c.score is not None:
            by_metric.setdefault(c.metric, []).append(c.score)
    if report.aggregate.retention is not None:
        by_metric.setdefault("retention", []).append(report.aggregate.retention)
    return by_metric, passed, checks


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _warm_stats(plans: Sequence[Any], lm: Any, progress: Progress | None) -> float:
    """Compute or load every statistic the plans need, so compile timing excludes them."""
    from kmec.compile import stats_for_step

    t0 = time.perf_counter()
    seen: set[str] = set()
    for plan in plans:
        for step in plan.steps:
            if step.needs_stats is not None and step.needs_stats.model_dump_json() not in seen:
                seen.add(step.needs_stats.model_dump_json())
                stats = stats_for_step(step, lm, progress)
                for layer in step.needs_stats.layers:
                    stats.second_moment(layer)
    return time.perf_counter() - t0


class _Runner:
    """Compile + apply + verify + revert on one loaded model."""

    def __init__(self, lm: Any, max_examples: int | None, progress: Progress | None,
                 root: str | Path | None = None) -> None:
        self.lm, self.root = lm, root
        self.edited = copy.deepcopy(lm.model)
        self.max_examples = max_examples
        self.progress = progress

    def run(self, spec: Any, plan: Any) -> tuple[Any, float, float, float]:
        """(report, compile seconds, verify seconds, peak MB) for one plan."""
        from kmec.artifacts import apply
        from kmec.compile import execute
        from kmec.verify import verify

        with _PeakRss() as rss:
            _reset_cuda_peak()
            t0 = time.perf_counter()
            artifact = execute(plan, self.lm, progress=self.progress, use_cache=False)
            compile_s = time.perf_counter() - t0
        peak = rss.extra_mb + _cuda_peak_mb()
        handle = apply(artifact, self.edited, fingerprint=self.lm.facts.fingerprint,
                       tok=self.lm.tok)
        try:
            t0 = time.perf_counter()
            report = verify(spec, plan, self.lm.model, self.edited, self.lm.tok,
                            max_examples=self.max_examples, artifact=artifact, root=self.root)
            verify_s = time.perf_counter() - t0
        finally:
            handle.revert()
        return report, compile_s, verify_s, peak


def _reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def bench(spec_path: str | Path, methods: Sequence[str], *, mode: Mode | None = None,
          model: str | None = None, limit: int | None = None, max_examples: int | None = None,
          editors: Sequence[str] | None = None, progress: Progress | None = None,
          root: str | Path | None = None, prompts: Prompts = "held out",
          dtype: str = "float32", device: str | None = None,
          device_map: str | Mapping[str, Any] | None = None) -> BenchResult:
    """Compile and verify ``spec_path`` with each of ``methods``; one row per method.

    Args:
        spec_path: the ``.kmec`` spec.
        methods: backend names (``kmec.backends.BACKENDS``).
        mode: ``single``, ``batch`` or ``sequence`` (default: the spec's ``order``).
        model: overrides the spec's model.
        limit: use only the first ``limit`` edits.
        max_examples: hypothesis examples per locality property.
        editors: models with a trained MEND editor, for the planner; None: the
            model's own editor in ``$KMEC_HOME/editors`` when there is one (as
            ``kmec compile`` does).
        progress: ``progress(message, done, total)``.
        root: the folder the spec's includes and subjects files must lie under
            (default: its repository, see :mod:`kmec.grammar.files`).
        prompts: ``held out`` (compile :func:`compile_view`, score the full spec) or
            ``declared`` (compile the spec as written).
        dtype, device, device_map: where and in what precision the model runs (see
            :func:`kmec.models.load.load_model`; default: the CPU, float32).

    Raises:
        KmecError: a bad spec, model or method (a method that fails part way
            is reported in its row's ``error`` instead, so the others still run).
    """
    from kmec.backends import BACKENDS
    from kmec.pipeline import start
    from kmec.planner import plan as make_plan

    spec_path = Path(spec_path)
    methods = parse_methods(",".join(methods), list(BACKENDS))

    def has_edits(spec: Any, _ref: Any) -> None:  # before the model loads
        if not spec.edits:
            raise PlanError(f"{spec_path} declares no edits to benchmark")

    s = start(spec_path, model=model, root=root, editors=editors, limit=limit,
              before_load=has_edits, dtype=dtype, device=device, device_map=device_map)
    spec, lm, editors = s.spec, s.lm, s.editors
    mode = mode or spec.order
    order = "sequence" if mode == "sequence" else "batch"

    def specs_for(method: str) -> list[Any]:
        base = _with_method(spec, method, order)
        if mode != "single":
            return [base]
        return [base.model_copy(update={"edits": (e,)}) for e in spec.edits]

    def compiled(s: Any) -> Any:
        return compile_view(s) if prompts == "held out" else s

    plans: dict[str, list[tuple[Any, Any]]] = {}
    errors: dict[str, str] = {}
    for method in methods:
        try:
            plans[method] = [(s, make_plan(compiled(s), lm.facts, backends=BACKENDS,
                                           editors=editors))
                             for s in specs_for(method)]
        except KmecError as e:
            errors[method] = str(e)
    stats_s = _warm_stats([p for ps in plans.values() for _, p in ps], lm, progress)
    runner = _Runner(lm, max_examples, progress, root)
    rows = []
    for method in methods:
        if method in errors:
            rows.append(_error_row(method, errors[method]))
            continue
        rows.append(_bench_method(runner, method, plans[method], progress))
    return BenchResult(kmec_version=__version__, spec=str(spec_path), model=lm.facts.name,
                       fingerprint=lm.facts.fingerprint, mode=mode, edits=len(spec.edits),
                       stats_s=round(stats_s, 2), rows=tuple(rows), prompts=prompts)


def _error_row(method: str, error: str) -> BenchRow:
    return BenchRow(method=method, edits=0, scores={}, passed=0, checks=0, compile_s=0.0,
                    s_per_edit=0.0, verify_s=0.0, peak_mb=0.0, error=error)


def _bench_method(runner: _Runner, method: str, plans: list[tuple[Any, Any]],
                  progress: Progress | None) -> BenchRow:
    by_metric: dict[str, list[float]] = {}
    passed = checks = requests = 0
    compile_s = verify_s = peak = 0.0
    for i, (spec, plan) in enumerate(plans):
        if progress:
            progress(f"bench {method}", i, len(plans))
        try:
            report, c_s, v_s, p_mb = runner.run(spec, plan)
        except KmecError as e:
            return _error_row(method, str(e))
        scores, ok, n = _metric_scores(report)
        for metric, xs in scores.items():
            by_metric.setdefault(metric, []).extend(xs)
        passed += ok
        checks += n
        requests += sum(len(s.edits) for s in plan.steps)
        compile_s += c_s
        verify_s += v_s
        peak = max(peak, p_mb)
    if progress:
        progress(f"bench {method}", len(plans), len(plans))
    return BenchRow(method=method, edits=requests,
                    scores={m: _mean(by_metric.get(m, [])) for m in METRICS},
                    passed=passed, checks=checks, compile_s=round(compile_s, 2),
                    s_per_edit=round(compile_s / max(requests, 1), 3),
                    verify_s=round(verify_s, 2), peak_mb=round(peak, 1))


def render_markdown(result: BenchResult) -> str:
    """The table as GitHub Markdown, with the run's provenance above it."""
    cols = [m for m in METRICS if any(r.scores.get(m) is not None for r in result.rows)]
    head = ["method", *cols, "claims held", "s/edit", "peak MB"]
    title = (f"`kmec bench {result.spec}` ({result.mode}, {result.edits} edits, model "
             f"{result.model} {result.fingerprint[:12]}, kmec {result.kmec_version}; "
             f"statistics {result.stats_s:.1f} s, not in s/edit)")
    lines = [title, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        if r.error:
            lines.append(f"| {r.method} | " + " | ".join(["–"] * (len(head) - 2))
                         + f" | error: {r.error.splitlines()[0]} |")
            continue
        cells = ["–" if r.scores.get(m) is None else f"{r.scores[m]:.3f}" for m in cols]
        lines.append(f"| {r.method} | " + " | ".join(cells)
                     + f" | {r.passed}/{r.checks} | {r.s_per_edit:.2f} | {r.peak_mb:.0f} |")
    lines += ["", f"Prompts: {result.prompts} — {result.prompts_note}."]
    return "\n".join(lines) + "\n"
