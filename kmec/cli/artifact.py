"""``kmec apply`` / ``kmec revert``: edited model folders from artifacts, and back."""

from __future__ import annotations

import typer

from kmec.cli._console import out_console, print_json
from kmec.cli._progress import reporting
from kmec.cli._runtime import device_option


def apply_cmd(
    target: str = typer.Argument(..., help="Build directory (kmec compile --out) or artifact folder."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the edited model to."),
    model: str = typer.Option(None, "--model", help="Base model (alias, folder or hub id); "
                              "default: the one the artifact was compiled for."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if kmec did not "
                               "write it (everything in it is lost)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON on stdout."),
    device: str = device_option(),
    dtype: str = typer.Option("float32", "--dtype", help="Precision of the edited folder's "
                              "weights: float32, bfloat16 or float16 (the base is checked in "
                              "float32, then cast; kmec revert restores it in this dtype)."),
) -> None:
    """Apply an artifact to its base model and save the edited model as a Hugging Face folder.

    The folder also holds kmec_edit.json and the original tensors of the edited
    parameters, so `kmec revert` can restore the base model exactly. External
    memories (method memory / retrieval) are saved in kmec_memory/ next to the
    unchanged weights; kmec.load_model(OUT) loads the model with them installed.
    """
    from kmec.artifacts.build import load_checked
    from kmec.artifacts.edited import write_edited
    from kmec.models.load import resolve_device, resolve_dtype
    from kmec.outputs import check_output

    resolve_dtype(dtype), resolve_device(device)  # a bad flag before anything is read
    check_output(out, "edited-model", inputs=[target], force=force)
    artifact = load_checked(target)
    with reporting("apply") as progress, \
            progress.stage("loading the base model and applying the artifact"):
        w = write_edited(artifact, out, model=model, inputs=[target], force=force, dtype=dtype,
                         device=device)
    n = len(artifact.manifest.payloads)
    memory = sum(e.kind == "memory" for e in artifact.manifest.payloads)
    if as_json:
        print_json({"out": str(w.path), "base_model": model or artifact.manifest.base_model,
                    "base_fingerprint": w.base_fingerprint,
                    "edited_fingerprint": w.edited_fingerprint, "params": list(w.params),
                    "dtype": resolve_dtype(dtype),
                    "payloads": n - memory, "memory_tables": memory,
                    "memory_dir": str(w.path / "kmec_memory") if memory else None,
                    "tokenizer": w.tokenizer})
        return
    console = out_console(highlight=False, soft_wrap=True)
    console.print(f"applied {n - memory} payload(s) to {len(w.params)} parameter(s) of "
                  f"{model or artifact.manifest.base_model} ({w.base_fingerprint[:12]}) -> "
                  f"{w.path}/ (fingerprint {w.edited_fingerprint[:12]}, tokenizer {w.tokenizer})",
                  markup=False)
    if memory:
        console.print(f"{memory} external-memory table(s) saved in {w.path}/kmec_memory/; "
                      f"load the model with the memory installed: kmec.load_model({str(w.path)!r})",
                      markup=False)


def revert_cmd(
    edited: str = typer.Argument(..., help="Folder written by kmec apply."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the restored base model to."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if kmec did not "
                               "write it (everything in it is lost)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was restored as JSON on stdout."),
) -> None:
    """Restore the base model bit-for-bit from a folder written by `kmec apply`."""
    from kmec.artifacts.edited import revert_folder

    with reporting("revert") as progress, progress.stage("restoring the base weights"):
        w = revert_folder(edited, out, force=force)
    if as_json:
        print_json({"out": str(w.path), "base_fingerprint": w.base_fingerprint,
                    "params": list(w.params)})
        return
    out_console(highlight=False, soft_wrap=True).print(
        f"restored {len(w.params)} parameter(s); {w.path}/ has the base fingerprint "
        f"{w.base_fingerprint[:12]}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_cmd)
    app.command("revert")(revert_cmd)
