"""``kmec train-editor``: train a MEND editor for a model; ``kmec editors``: list them.

    kmec train-editor --model smollm2-135m --data zsre_mend_train_1k.json
                      [--limit N] [--steps N] [--held-out N] [--batch N] [--layers 27-29]
                      [--eval FILE --eval-limit N] [--resume/--fresh]
    kmec editors

Training writes a checkpoint every 50 steps; rerunning the same command after
an interruption resumes from it (``--fresh`` starts over). Once a model has an
editor, ``kmec compile`` plans MEND for its specs unless a spec names another
method.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from kmec.cli._console import out_console, print_json
from kmec.cli._progress import reporting
from kmec.cli._runtime import device_map_option, device_option, dtype_option


def _curve_table(curve: list[dict[str, float]]) -> Table:
    table = Table("step", "loss", "edit NLL", "KL unrelated", "KL text", "edit acc", "α",
                  title="loss curve (means over the steps since the previous row)")
    for p in curve:
        table.add_row(str(int(p["step"])), f"{p['loss']:.4f}", f"{p['edit_nll']:.4f}",
                      f"{p['loc_kl']:.4f}", f"{p.get('text_kl', 0.0):.4f}",
                      f"{p['edit_acc']:.3f}", f"{p['alpha']:.2e}")
    return table


def _scores_table(evals: dict[str, dict[str, float]]) -> Table:
    table = Table("records", "n", "efficacy", "top-1", "P(target) up", "paraphrase", "locality",
                  "KL unrelated", "ppl ratio", title="single edits on records not trained on")
    for name, s in evals.items():
        para = (f"{s['paraphrase_before']:.3f} -> {s['paraphrase']:.3f}"
                if "paraphrase" in s else "-")
        table.add_row(name, str(int(s["n"])), f"{s['efficacy_before']:.3f} -> {s['efficacy']:.3f}",
                      f"{s['top1']:.3f}", f"{s['prob_up']:.3f}", para, f"{s['locality']:.3f}",
                      f"{s['loc_kl']:.4f}", f"{s.get('ppl_ratio', float('nan')):.3f}")
    return table


def train_editor_cmd(
    model: str = typer.Option("smollm2-135m", "--model", help="Alias, model folder or hub id."),
    data: Path = typer.Option(..., "--data", help="zsRE or CounterFact records (JSON)."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N records of --data."),
    steps: int = typer.Option(None, "--steps", help="Training steps [default: 1000]."),
    held_out: int = typer.Option(50, "--held-out", help="Records kept out of training and "
                                 "scored after it."),
    batch: int = typer.Option(None, "--batch", help="Edits per step [default: 4]."),
    layers: str = typer.Option(None, "--layers", help="Edited layers [default: the last 3]."),
    eval_file: Path = typer.Option(None, "--eval", help="Also score edits from this file."),
    eval_limit: int = typer.Option(100, "--eval-limit", help="Records of --eval to score."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split, batch order and init."),
    resume: bool = typer.Option(True, "--resume/--fresh",
                                help="Continue an interrupted identical run, or start over."),
    as_json: bool = typer.Option(False, "--json", help="Print the editor's manifest (loss "
                                 "curve, held-out scores) as JSON on stdout."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """Train a MEND hypernetwork editor for MODEL on edit records (saved by fingerprint)."""
    from kmec.backends.mend import DataInfo, TrainConfig, read_records, split_records, train_editor
    from kmec.cli.stats import parse_layers
    from kmec.hashing import sha256_file
    from kmec.models.load import load_model
    from kmec.pipeline import check_runtime
    from kmec.planner.layers import check_layers, default_layers

    check_runtime(dtype, device, device_map)
    dataset, records = read_records(data)
    total = len(records)
    if limit is not None:
        records = records[:limit]
    train, held = split_records(records, held_out, seed=seed)
    extra = {}
    if eval_file is not None:
        _, ev = read_records(eval_file)
        extra[f"{eval_file.name}[:{eval_limit}]"] = ev[:eval_limit]
    console = out_console(highlight=False, soft_wrap=True)
    with reporting("train-editor", transient=False) as progress:
        with progress.stage(f"loading {model}"):
            lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
        chosen = (check_layers(parse_layers(layers), lm.facts) if layers
                  else default_layers(lm.facts, "mend").layers)
        overrides = {k: v for k, v in {"steps": steps, "batch": batch}.items() if v is not None}
        config = TrainConfig(seed=seed, **overrides)
        info = DataInfo(path=str(data.resolve()), sha256=sha256_file(data), dataset=dataset,
                        records=total, train=len(train), held_out=len(held))
        if not as_json:
            console.print(f"training a MEND editor for {lm.facts.name} layers {list(chosen)} on "
                          f"{len(train)} {dataset} records ({len(held)} held out), "
                          f"{config.steps} steps of {config.batch} edits", markup=False)

        def phases(message: str, done: int, total: int) -> None:
            # "loss 1.234 (...)" changes every step: one series, "train: loss ..."
            progress(f"train: {message}" if message.startswith("loss") else message, done, total)

        result = train_editor(lm.model, lm.tok, lm.facts, train, layers=chosen, config=config,
                              data=info, held_out=held, extra_eval=extra, resume=resume,
                              progress=phases)
    m = result.manifest
    if as_json:
        print_json({**m.model_dump(mode="json"), "resumed_from": result.resumed_from})
        return
    if result.resumed_from:
        console.print(f"resumed from step {result.resumed_from}")
    console.print(_curve_table(m.metrics["curve"]))
    together = m.metrics.get("held_out_together") or {}
    evals = {"held out": m.metrics["held_out"],
             f"held out, {together.get('group', 0)} at once": together,
             **m.metrics.get("eval", {})}
    evals = {k: v for k, v in evals.items() if v}
    if evals:
        console.print(_scores_table(evals))
    console.print(f"trained {m.metrics['steps']} steps in {m.metrics['seconds']:.0f} s; editor "
                  f"{m.sha256[:12]} saved for {m.model} ({m.fingerprint[:12]})", markup=False)


def editors_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the editors' manifests as JSON "
                                 "on stdout."),
) -> None:
    """List the trained MEND editors (kmec compile uses them for their models)."""
    from kmec.backends.mend import list_editors
    from kmec.backends.mend.store import editors_root

    found = list_editors()
    if as_json:
        print_json([m.model_dump(mode="json") for m in found])
        return
    console = out_console(highlight=False, soft_wrap=True)
    if not found:
        console.print(f"no trained editors in {editors_root()}", markup=False)
        return
    table = Table("model", "weights", "layers", "steps", "time", "final loss", "held-out efficacy",
                  "locality", "ppl ratio", "data", "editor")
    for m in found:
        curve, held = m.metrics.get("curve") or [{}], m.metrics.get("held_out") or {}
        table.add_row(escape(m.model), m.fingerprint[:8], ",".join(map(str, m.layers)),
                      str(m.metrics.get("steps", "")), f"{m.metrics.get('seconds', 0):.0f} s",
                      f"{curve[-1].get('loss', float('nan')):.4f}",
                      f"{held.get('efficacy', float('nan')):.3f}",
                      f"{held.get('locality', float('nan')):.3f}",
                      f"{held.get('ppl_ratio', float('nan')):.3f}",
                      escape(Path(m.metrics.get("data", {}).get("path", "?")).name),
                      m.sha256[:12])
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("train-editor")(train_editor_cmd)
    app.command("editors")(editors_cmd)

