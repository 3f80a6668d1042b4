"""``kmec model install|list|info``: manage model references and the model cache."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from kmec.cli._console import out_console, print_json
from kmec.cli._progress import reporting
from kmec.models.load import ALIASES, MODEL_META, alias_dir, install_alias, load_model

model_app = typer.Typer(help="Install, list and inspect models.", no_args_is_help=True)


@model_app.command("install")
def install(
    name: str = typer.Argument(..., help="Alias to install, e.g. smollm2-135m."),
    force: bool = typer.Option(False, "--force", help="Reinstall even if cached."),
    as_json: bool = typer.Option(False, "--json", help="Print the alias, location and "
                                 "fingerprint as JSON on stdout."),
) -> None:
    """Install an embedded model into kmec's cache (once; later loads take ~1 s)."""
    with reporting("model install") as progress:
        # the installer names its phases without counts: each is a stage of its own
        path = install_alias(name, force=force, progress=lambda m: progress(f"{name}: {m}", 0, 0))
    meta = json.loads((path / MODEL_META).read_text())
    if as_json:
        print_json({"alias": name, "path": str(path), "fingerprint": meta["fingerprint"]})
        return
    out_console(highlight=False, soft_wrap=True).print(
        f"installed {name} at {path}\nfingerprint {meta['fingerprint']}", markup=False)


@model_app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print the aliases as JSON on stdout."),
) -> None:
    """List the embedded model aliases and whether they are installed."""
    rows = []
    for alias in ALIASES.values():
        path = alias_dir(alias.name)
        rows.append({"alias": alias.name, "installed": (path / MODEL_META).exists(),
                     "description": alias.description, "path": str(path)})
    if as_json:
        print_json(rows)
        return
    table = Table("alias", "installed", "description", "location")
    for r in rows:
        table.add_row(escape(r["alias"]), "yes" if r["installed"] else "no",
                      escape(r["description"]),
                      escape(r["path"]) if r["installed"] else f"kmec model install {r['alias']}")
    out_console(highlight=False).print(table)


@model_app.command("info")
def info(
    name: str = typer.Argument(..., help="Alias, model folder or hub id."),
    prompt: str = typer.Option("The capital of France is", help="Prompt for a greedy sample."),
    tokens: int = typer.Option(8, help="Tokens to generate for the sample (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Architecture, sizes, fingerprint and cache location of a model, plus a sample."""
    import torch

    lm = load_model(name)
    f = lm.facts
    sample = None
    if tokens > 0:
        ids = lm.tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = lm.model.generate(**ids, max_new_tokens=tokens, do_sample=False,
                                    pad_token_id=lm.tok.pad_token_id)
        sample = lm.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    data = {**f.model_dump(), "location": lm.ref.location, "kind": lm.ref.kind,
            "sample": {"prompt": prompt, "completion": sample} if sample is not None else None}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key in ("name", "arch", "family", "n_layers", "d_model", "d_mlp", "vocab_size",
                "n_params", "dtype", "tied_embeddings", "fingerprint", "location"):
        table.add_row(key, escape(str(data[key])))
    if sample is not None:
        table.add_row("sample", escape(f"{prompt!r} -> {sample!r}"))
    out_console(highlight=False).print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
