"""``kmec stats``: compute (or list) cached second moments of MLP keys.

    kmec stats smollm2-135m --layers 3-8 [--corpus PATH] [--tokens N] [--max-len N]
    kmec stats --list
    torchrun --nproc-per-node 2 -m kmec stats smollm2-135m --layers 3-8

The flags build the same StatsRequest the planner writes into a plan, so a
later ``kmec compile`` finds these entries in the cache.
"""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from kmec.cli._console import out_console, print_json
from kmec.cli._progress import reporting
from kmec.cli._runtime import device_map_option, device_option, dtype_option
from kmec.errors import StatsError


def parse_layers(text: str) -> tuple[int, ...]:
    """``"3-5,9"`` -> ``(3, 4, 5, 9)``.

    >>> parse_layers("3-5,9")
    (3, 4, 5, 9)

    Raises:
        StatsError: text that is not a list of layers and ranges.
    """
    out: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            start, end = int(lo), int(hi) if sep else int(lo)
            if end < start:
                raise ValueError(part)
            out.update(range(start, end + 1))
    except ValueError:
        raise StatsError(f"bad --layers value {text!r}",
                         hint="use indices and ranges such as 3-8 or 2,4,6-7") from None
    if not out:
        raise StatsError("--layers names no layer", hint="e.g. --layers 3-8")
    return tuple(sorted(out))


def _list_cache(as_json: bool) -> None:
    from kmec.stats import StatsCache

    cache = StatsCache()
    entries = cache.entries()
    if as_json:
        print_json({"cache": str(cache.root), "entries": [
            {"path": str(e.path), "model": e.model, "key": e.key.model_dump(mode="json"),
             "tokens": e.tokens, "requested": e.requested, "exhausted": e.exhausted,
             "corpus": e.corpus, "created": e.created, "bytes": e.size} for e in entries]})
        return
    console = out_console(highlight=False, soft_wrap=True)
    if not entries:
        console.print(f"no cached statistics in {cache.root}", markup=False)
        return
    table = Table("model", "weights", "layer", "tokens", "max_len", "dtype", "corpus", "MB",
                  "created")
    for e in entries:
        table.add_row(escape(e.model), e.key.model_fingerprint[:8], str(e.key.layer),
                      f"{e.tokens:,}", str(e.key.max_len), e.key.dtype,
                      escape(f"{e.corpus} ({e.key.corpus_fingerprint[:8]})"),
                      f"{e.size / 2**20:.1f}", e.created[:10])
    console.print(table)
    console.print(f"{len(entries)} entries in {cache.root}", markup=False)


def _products(value: str) -> str:
    from kmec.kernels import PRODUCTS

    aliases = {"bf16": "bfloat16", "fp32": "float32"}
    value = aliases.get(value, value)
    if value not in PRODUCTS:
        raise StatsError(f"unknown --products {value!r}", hint=f"use one of: {', '.join(PRODUCTS)}")
    return value


def stats(
    model: str = typer.Argument(None, help="Alias, model folder or hub id."),
    layers: str = typer.Option(None, "--layers", help="Layers, e.g. 3-8 or 2,4,6-7."),
    corpus: str = typer.Option("default", "--corpus",
                               help="'default', a text/JSONL file or a folder of them."),
    tokens: int = typer.Option(None, "--tokens", help="Token budget [default: 100000]."),
    max_len: int = typer.Option(None, "--max-len", help="Tokens per window [default: 256]."),
    samples: int = typer.Option(None, "--samples", help="Optional sample (window) budget."),
    dtype: str = dtype_option(),
    device: str = device_option(),
    device_map: str = device_map_option(),
    kernel: str = typer.Option(None, "--kernel", help="torch | triton [default: by device]."),
    products: str = typer.Option("bfloat16", "--products",
                                 help="Precision of the k·kᵀ products: bfloat16 (keys rounded "
                                 "to bf16, exact products summed in fp32: what plans use) or "
                                 "float32."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Padded tokens per batch."),
    list_: bool = typer.Option(False, "--list", help="List the statistics cache and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the layers computed (or, with "
                                 "--list, the cache) as JSON on stdout."),
) -> None:
    """Compute the second moments E[k kᵀ] of MLP keys for layers of a model (cached)."""
    if list_:
        _list_cache(as_json)
        return
    if model is None or layers is None:
        raise StatsError("kmec stats needs a MODEL and --layers (or --list)",
                         hint="e.g. kmec stats smollm2-135m --layers 3-8")
    from kmec.models.adapters import adapter_for
    from kmec.models.load import load_model, resolve_device, resolve_dtype
    from kmec.pipeline import check_runtime
    from kmec.planner.model import StatsRequest
    from kmec.stats import DEFAULT_MAX_LEN, DEFAULT_TOKENS, distributed, provider

    check_runtime(dtype, device, device_map)  # before the model loads
    dtype = resolve_dtype(dtype)
    if device_map is None:
        device = resolve_device(device)
    dist = distributed.init_from_env(device or "cpu")
    request = StatsRequest(layers=parse_layers(layers), corpus=corpus,
                           tokens=tokens or DEFAULT_TOKENS, max_len=max_len or DEFAULT_MAX_LEN,
                           dtype=dtype, products=_products(products))
    start = time.monotonic()
    # statistics take minutes: keep the finished bar on a terminal (transient=False)
    with reporting("stats", transient=False, enabled=dist.is_main) as progress:
        with progress.stage(f"loading {model}"):
            lm = load_model(model, dtype=dtype, device=None if device_map else device,
                            device_map=device_map)
        adapter = adapter_for(lm.facts.model_type)
        stats_provider = provider(lm.model, lm.tok, lm.facts, adapter, request,
                                  progress=progress, kernel=kernel,
                                  batch_tokens=batch_tokens, samples=samples)
        moments = stats_provider.prepare()
    if not dist.is_main:
        return
    rows = [{"layer": layer, "module": adapter.site("mlp_out", layer),
             "tokens": moments[layer].count, "source": stats_provider.sources.get(layer, ""),
             "trace": float(moments[layer].moment().trace())} for layer in stats_provider.layers]
    seconds = time.monotonic() - start
    if as_json:
        print_json({"model": model, "fingerprint": lm.facts.fingerprint,
                    "request": request.model_dump(mode="json"), "layers": rows,
                    "seconds": round(seconds, 3), "cache": str(stats_provider.cache.root)})
        return
    table = Table("layer", "module", "tokens", "source", "trace of E(kkᵀ)")
    for r in rows:
        table.add_row(str(r["layer"]), escape(r["module"]), f"{r['tokens']:,}",
                      escape(r["source"]), f"{r['trace']:.4g}")
    console = out_console(highlight=False, soft_wrap=True)
    console.print(table)
    console.print(f"done in {seconds:.1f} s; cache: {stats_provider.cache.root}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
