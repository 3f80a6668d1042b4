"""``kmec apply`` / ``kmec revert``: edited model folders from artifacts, and back."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(highlight=False, stderr=True)
out_console = Console(highlight=False, soft_wrap=True)


def apply_cmd(
    target: str = typer.Argument(..., help="Build directory (kmec compile --out) or artifact folder."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the edited model to."),
    model: str = typer.Option(None, "--model", help="Base model (alias, folder or hub id); "
                              "default: the one the artifact was compiled for."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if kmec did not "
                               "write it (everything in it is lost)."),
) -> None:
    """Apply an artifact to its base model and save the edited model as a Hugging Face folder.

    The folder also holds kmec_edit.json and the original tensors of the edited
    parameters, so `kmec revert` can restore the base model exactly. External
    memories (method memory / retrieval) are saved in kmec_memory/ next to the
    unchanged weights; kmec.load_model(OUT) loads the model with them installed.
    """
    from kmec.artifacts.build import load_checked
    from kmec.artifacts.edited import write_edited
    from kmec.outputs import check_output

    check_output(out, "edited-model", inputs=[target], force=force)
    artifact = load_checked(target)
    with console.status("loading the base model and applying the artifact"):
        w = write_edited(artifact, out, model=model, inputs=[target], force=force)
    n = len(artifact.manifest.payloads)
    memory = sum(e.kind == "memory" for e in artifact.manifest.payloads)
    out_console.print(f"applied {n - memory} payload(s) to {len(w.params)} parameter(s) of "
                      f"{model or artifact.manifest.base_model} ({w.base_fingerprint[:12]}) -> "
                      f"{w.path}/ (fingerprint {w.edited_fingerprint[:12]}, tokenizer {w.tokenizer})")
    if memory:
        out_console.print(f"{memory} external-memory table(s) saved in {w.path}/kmec_memory/; "
                          f"load the model with the memory installed: kmec.load_model({str(w.path)!r})")


def revert_cmd(
    edited: str = typer.Argument(..., help="Folder written by kmec apply."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the restored base model to."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if kmec did not "
                               "write it (everything in it is lost)."),
) -> None:
    """Restore the base model bit-for-bit from a folder written by `kmec apply`."""
    from kmec.artifacts.edited import revert_folder

    with console.status("restoring the base weights"):
        w = revert_folder(edited, out, force=force)
    out_console.print(f"restored {len(w.params)} parameter(s); {w.path}/ has the base "
                      f"fingerprint {w.base_fingerprint[:12]}")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_cmd)
    app.command("revert")(revert_cmd)
