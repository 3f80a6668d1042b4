"""``kmec model install|list|info``: manage model references and the model cache."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from kmec.models.load import ALIASES, MODEL_META, alias_dir, install_alias, load_model

model_app = typer.Typer(help="Install, list and inspect models.", no_args_is_help=True)
console = Console(highlight=False)


@model_app.command("install")
def install(
    name: str = typer.Argument(..., help="Alias to install, e.g. smollm2-135m."),
    force: bool = typer.Option(False, "--force", help="Reinstall even if cached."),
) -> None:
    """Install an embedded model into kmec's cache (once; later loads take ~1 s)."""
    with console.status(f"installing {name}") as status:
        path = install_alias(name, force=force, progress=lambda m: status.update(f"{name}: {m}"))
    meta = json.loads((path / MODEL_META).read_text())
    console.print(f"installed {name} at {path}\nfingerprint {meta['fingerprint']}")


@model_app.command("list")
def list_models() -> None:
    """List the embedded model aliases and whether they are installed."""
    table = Table("alias", "installed", "description", "location")
    for alias in ALIASES.values():
        path = alias_dir(alias.name)
        ok = (path / MODEL_META).exists()
        table.add_row(alias.name, "yes" if ok else "no", alias.description,
                      str(path) if ok else f"kmec model install {alias.name}")
    console.print(table)


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
        table.add_row(key, str(data[key]))
    if sample is not None:
        table.add_row("sample", f"{prompt!r} -> {sample!r}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
