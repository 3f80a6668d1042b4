"""``kmec trace SPEC|PROMPT``: causal tracing — where does the model recall a fact?

With a spec, every edit's prompt is traced on the base model with the answer
the model gives today (the edit's ``old`` object when the spec declares one,
else the model's own top token). With a prompt, ``--subject`` names the span
to corrupt. Prints one table per prompt (indirect effect per layer at the
subject's last token and at the last token, with bars), then the layers where
the mean indirect effect peaks next to the planner's default layers.
``--out DIR`` writes ``traces.json``, one SVG heat map per trace, ``mean.svg``,
``index.md`` and ``index.html``. Traces are cached per model under
``$KMEC_HOME/trace``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from kmec.cli._console import out_console
from kmec.cli._progress import Reporter, reporting
from kmec.cli._runtime import device_map_option, device_option, dtype_option

# markup=False: prompts and subjects are printed verbatim, brackets included.
console = out_console(highlight=False, markup=False)
err_console = out_console(stderr=True, highlight=False, markup=False, soft_wrap=True)
BLOCKS = " ▏▎▍▌▋▊▉█"


def _bar(value: float, scale: float, width: int = 8) -> str:
    """A horizontal bar of ``width`` cells for ``value / scale`` (negatives: empty)."""
    eighths = round(min(max(value / scale, 0.0), 1.0) * width * 8) if scale > 0 else 0
    full, part = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[part] if part else "")).ljust(width)


def _source(target: str, subject: str | None, answer: str | None, model: str | None
            ) -> tuple[Any, str]:
    """The spec TARGET names (None for a prompt) and the model reference to load."""
    from kmec.errors import KmecError
    from kmec.grammar import parse_file
    from kmec.models.load import DEFAULT_MODEL

    path = Path(target)
    if target.endswith(".kmec") or path.is_file():
        if subject or answer:
            raise typer.BadParameter("--subject and --answer apply to a prompt, not a spec")
        if not path.is_file():
            raise KmecError(f"spec file {target!r} does not exist",
                            hint="check the path, or quote a prompt to trace it")
        spec = parse_file(path)
        return spec, model or spec.model or DEFAULT_MODEL
    if not subject:
        raise typer.BadParameter("tracing a prompt needs --subject (the span to corrupt)")
    return None, model or DEFAULT_MODEL


def _spec_jobs(spec: Any, facts: Any) -> list[tuple[str, str, str | None]]:
    """Each edit of the spec as (prompt, subject, old answer or None)."""
    from kmec.errors import KmecError
    from kmec.planner.draft import Draft
    from kmec.planner.passes.resolve import resolve

    jobs = []
    for e in resolve(Draft(spec=spec), facts).edits:
        r = e.request
        if not r.subject:
            err_console.print(f"skipping edit {r.name!r}: it names no subject to corrupt")
            continue
        jobs.append((r.prompt, r.subject, r.target_old))
    if not jobs:
        raise KmecError("the spec has no edit with a subject to trace",
                        hint="trace a prompt instead: kmec trace PROMPT --subject S")
    return jobs


def _table(results: list[Any]) -> Table:
    first = results[0]
    scale = max(max(max(r.ie_subject_last), max(r.ie_last), r.p_clean - r.p_corrupted)
                for r in results)
    subj = "".join(first.tokens[first.subject_first:first.subject_last + 1]).strip()
    title = (f"{first.prompt!r} → {first.answer!r}   P_clean {first.p_clean:.3f}, "
             f"P_corrupted {first.p_corrupted:.3f}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right", no_wrap=True, min_width=5)
    for r in results:
        name = r.kind if r.window == 1 else f"{r.kind} w{r.window}"
        table.add_column(f"{name}\n@ {subj!r}", no_wrap=True)
        table.add_column(f"{name}\n@ {first.tokens[first.last]!r}", no_wrap=True)
    for layer in range(first.n_layers):
        cells = []
        for r in results:
            for v in (r.ie_subject_last[layer], r.ie_last[layer]):
                cells.append(f"{v:+.3f} {_bar(v, scale)}")
        table.add_row(str(layer), *cells)
    return table


def _summary(results: list[Any], kinds: list[str], n_layers: int) -> dict[str, Any]:
    """Per kind: the window, the mean IE curves, and the peak bands — over all
    layers, and past every window that contains layer 0 (see peak_layers) — each with
    whether its peak stands out of the noise (``flat``: it does not; see peak_test)."""
    from kmec.models.trace import mean_ie, peak_layers, peak_test

    def noise(min_layer: int) -> dict[str, Any]:
        t = peak_test(results, kind=kind, min_layer=min_layer)  # type: ignore[arg-type]
        return {"flat": not t.stands_out, "height": t.height, "noise": t.noise}

    out: dict[str, Any] = {}
    for kind in kinds:
        window = next(r.window for r in results if r.kind == kind)
        skip = min(window // 2 + 1, n_layers - 1)
        out[kind] = {
            "window": window,
            "mean_ie": {"subject_last": list(mean_ie(results, kind=kind)),  # type: ignore[arg-type]
                        "last": list(mean_ie(results, kind=kind, position="last"))},  # type: ignore[arg-type]
            "peak_layers": peak_layers(results, kind=kind),  # type: ignore[arg-type]
            "peak_test": noise(0),
            "peak_layers_past_layer0": {"min_layer": skip, "layers": peak_layers(
                results, kind=kind, min_layer=skip), **noise(skip)},  # type: ignore[arg-type]
        }
    return out


def _print_summary(summary: dict[str, Any], facts: Any, n: int) -> None:
    from kmec.planner.layers import default_layers, layer_span

    def peak(curve: list[float], layers: list[int], test: dict[str, Any]) -> str:
        if test["flat"]:  # naming the highest layer of a flat curve would point at noise
            return (f"flat within noise (the highest layer is {test['height']:.3f} above the "
                    f"median, noise {test['noise']:.3f}): no peak layer")
        best = max(layers, key=curve.__getitem__)
        return f"peak layer {best} ({curve[best]:.3f}), band {layer_span(tuple(layers))}"

    for kind, s in summary.items():
        curve = s["mean_ie"]["subject_last"]
        past = s["peak_layers_past_layer0"]
        line = (f"mean {kind} IE (window {s['window']}) at the subject's last token over {n} "
                f"prompt(s): {peak(curve, s['peak_layers'], s['peak_test'])}")
        if kind != "hidden":
            line += (f"; from layer {past['min_layer']} on (windows without layer 0): "
                     f"{peak(curve, past['layers'], past)}")
        console.print(line, markup=False)
    rome, memit = default_layers(facts, "rome").layers, default_layers(facts, "memit").layers
    console.print(f"planner defaults for {facts.name}: ROME {layer_span(rome)}, "
                  f"MEMIT {layer_span(memit)}")


def _write_out(out: Path, results: list[Any], data: dict[str, Any], model: str) -> None:
    from kmec.hashing import atomic_write_text, canonical_json
    from kmec.models import trace_render as render
    from kmec.outputs import ensure_folder

    ensure_folder(out, "trace")
    atomic_write_text(out / "traces.json", canonical_json(data))
    files, svgs = [], []
    prompts = list(dict.fromkeys(r.prompt for r in results))
    for r in results:
        name = f"{prompts.index(r.prompt):02d}-{render.slug(r.prompt)}-{r.kind}.svg"
        svg = render.svg_heatmap(r)
        atomic_write_text(out / name, svg)
        files.append(name)
        svgs.append(svg)
    summary = data["summary"]
    peaks = {k: [] if s["peak_test"]["flat"] else s["peak_layers"] for k, s in summary.items()}
    lines = {f"{k} @ {pos.replace('_', ' ')}": v for k, s in summary.items()
             for pos, v in s["mean_ie"].items()}
    curves_svg = render.svg_curves(lines, title=f"mean indirect effect per layer, "
                                   f"{len(prompts)} prompt(s), {model}")
    atomic_write_text(out / "mean.svg", curves_svg)
    atomic_write_text(out / "index.md", render.markdown(results, files, model=model, peaks=peaks,
                                                        curves_file="mean.svg"))
    atomic_write_text(out / "index.html", render.html(results, svgs, model=model, peaks=peaks,
                                                      curves_svg=curves_svg))


def _cache_identity(lm: Any) -> str:
    """What keys a model's traces in the cache: its fingerprint, and the device and dtype
    it ran on when they are not the default (the CPU in float32), since they change the
    numbers a little (the default keeps the keys traces were always cached under)."""
    from kmec.hashing import canonical_json, sha256_text

    runtime = getattr(lm, "runtime", None)
    if runtime is None or runtime.is_default:
        return str(lm.facts.fingerprint)
    return sha256_text(canonical_json({"weights": lm.facts.fingerprint,
                                       "runtime": runtime.to_json()}))


def _trace_all(lm: Any, jobs: list[tuple[str, str, str | None]], kinds: list[str],
               params: dict[str, Any], *, refresh: bool, progress: Reporter
               ) -> tuple[list[Any], int]:
    """Trace every (prompt, kind), through the cache when the model has a
    fingerprint; return the results and how many were cache hits."""
    from kmec.models.adapters import adapter_for
    from kmec.models.trace import trace, trace_cached

    adapter = adapter_for(lm.facts.model_type)
    results, hits = [], 0
    total = len(jobs) * len(kinds)
    for prompt, subject, answer in jobs:
        for kind in kinds:
            # one series ("tracing") whatever the prompt: the rate and ETA span all of them
            progress(f"tracing: {prompt!r} ({kind})", len(results), total)
            args = (lm.model, lm.tok, adapter, prompt, subject)
            if lm.facts.fingerprint:
                r, hit = trace_cached(*args, target=answer, kind=kind, refresh=refresh,
                                      fingerprint=_cache_identity(lm), **params)
                hits += hit
            else:
                r = trace(*args, target=answer, kind=kind, **params)
            results.append(r)
    progress("tracing: done", total, total)
    return results, hits


def trace_command(
    target: str = typer.Argument(..., metavar="SPEC|PROMPT",
                                 help="A .kmec spec (traces each edit) or a prompt."),
    subject: str | None = typer.Option(None, "--subject", "-s",
                                       help="Span of PROMPT whose embeddings are corrupted."),
    answer: str | None = typer.Option(None, "--answer", "-a",
                                      help="Answer to trace (default: the model's top token)."),
    model: str | None = typer.Option(None, "--model", metavar="REF",
                                     help="Model (default: the spec's, else smollm2-135m)."),
    kind: str = typer.Option("hidden,mlp", "--kind", "-k",
                             help="States to restore, comma-separated: hidden, mlp, attn."),
    window: int | None = typer.Option(None, "--window", min=1,
                                      help="Layers restored around each layer (default: 1 for "
                                      "hidden, 10 for mlp/attn)."),
    samples: int = typer.Option(10, "--samples", min=1, help="Noise samples per trace."),
    noise: float | None = typer.Option(None, "--noise",
                                       help="Noise std (default: 3 × the embeddings' std)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise."),
    positions: str = typer.Option("all", "--positions",
                                  help="all, or key (the subject's last token and the last)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Folder for JSON, SVG, Markdown, HTML."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute cached traces."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    force: bool = typer.Option(False, "--force", help="Write into --out even if it holds "
                               "files kmec did not write."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """Causal tracing (ROME §2.1): which layers carry the fact behind a prompt's answer."""
    from kmec.hashing import canonical_json
    from kmec.models.load import load_model
    from kmec.models.trace import KINDS
    from kmec.pipeline import check_runtime

    kinds = list(dict.fromkeys(k.strip() for k in kind.split(",") if k.strip()))
    if not kinds or any(k not in KINDS for k in kinds) or positions not in ("all", "key"):
        raise typer.BadParameter(f"--kind takes {', '.join(KINDS)} (comma-separated); "
                                 "--positions takes all or key")
    if out is not None:
        from kmec.outputs import check_output

        check_output(out, "trace", inputs=[target] if Path(target).exists() else [],
                     force=force)
    check_runtime(dtype, device, device_map)
    spec, ref = _source(target, subject, answer, model)
    with reporting("trace") as progress:
        with progress.stage(f"loading {ref}"):
            lm = load_model(ref, dtype=dtype, device=device, device_map=device_map)
        jobs = (_spec_jobs(spec, lm.facts) if spec is not None
                else [(target, subject or "", answer)])
        params = {"samples": samples, "noise": noise, "seed": seed, "window": window,
                  "positions": None if positions == "all" else ()}
        results, hits = _trace_all(lm, jobs, kinds, params, refresh=no_cache, progress=progress)
    summary = _summary(results, kinds, lm.facts.n_layers)
    data = {"model": ref, "fingerprint": lm.facts.fingerprint, "summary": summary,
            "results": [r.summary() for r in results]}
    if out is not None:
        _write_out(Path(out), results, data, ref)
    if as_json:
        typer.echo(canonical_json(data), nl=False)
        return
    for i in range(0, len(results), len(kinds)):
        console.print(_table(results[i:i + len(kinds)]))
    _print_summary(summary, lm.facts, len(jobs))
    if hits:
        err_console.print(f"{hits} of {len(results)} trace(s) came from the cache")
    if out is not None:
        console.print(f"wrote {out}/traces.json, {len(results)} heat map(s), index.md, index.html")


def register(app: typer.Typer) -> None:
    app.command("trace")(trace_command)
