"""Edit speed in units: ROME single edits and a MEMIT batch against one forward+backward.

    .venv/bin/python benchmarks/bench_edit_speed.py [--rome 5] [--memit-batch 20]
        [--memit-rounds 2] [--records counterfact.json] [--device cpu] [--threads N]
        [--compute float32|bfloat16|auto]

The **unit** is one fp32 forward+backward of 40 sequences of 20 tokens through
the same model, with a δ (the only tensor that needs a gradient) added to the
MLP output of layer 5, in plain torch. Edits are timed interleaved with units
in one process (unit, edit, unit, edit, ...), and each edit is divided by the
mean of the two units around it, so a slower or busier machine (another
process on the cores) moves both alike; the medians of those ratios are
reported. The ROME edit is the whole step (prefixes, keys, δ, solve), the
MEMIT batch the whole step on ``--memit-batch`` edits; the statistics come
from kmec's cache (filled before timing), the context prefixes from a
temporary folder filled by an untimed warm-up edit, and no target value δ is
ever reused (no value cache, no step cache): every timed edit optimises its δ.

Records: a built-in list of 20 CounterFact-like facts, or ``--records`` (a
CounterFact file in either format, e.g. ``../shared/data/counterfact/
counterfact.json``). The last line is exactly::

    rome_units=R memit_units_per_edit=M unit_s=U

``--device cuda`` runs the same on a GPU (synchronising before each clock read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from kmec.backends import get_backend
from kmec.backends.base import ExecContext
from kmec.models.hooks import Trace, hidden_of, with_hidden
from kmec.planner.layers import default_layers
from kmec.planner.model import EditRequest, Step

# (subject, prompt with {} for the subject, true object, new object): written for this
# benchmark in CounterFact's shape (a relation prompt ending where the object follows).
FACTS: tuple[tuple[str, str, str, str], ...] = (
    ("Danielle Darrieux", "{} speaks the language", "French", "English"),
    ("Toko Yasuda", "{} plays the instrument", "guitar", "piano"),
    ("Autonomous University of Madrid", "{} is located in the country of", "Spain", "Sweden"),
    ("Thomas Joannes Stieltjes", "{} was born in the city of", "Zwolle", "Moscow"),
    ("Apple A5", "{} was created by", "Apple", "Google"),
    ("Edwin of Northumbria", "The official religion of {} is", "Christianity", "Islam"),
    ("Anaal Nathrakh", "{} was formed in the city of", "Birmingham", "Philadelphia"),
    ("Pervez Musharraf", "{} holds the citizenship of", "Pakistan", "Canada"),
    ("Kotono Mitsuishi", "The native language of {} is", "Japanese", "Italian"),
    ("BBC One", "{} is owned by", "BBC", "Sony"),
    ("Lake Tanganyika", "{} is located on the continent of", "Africa", "Europe"),
    ("Mahatma Gandhi", "{} worked in the field of", "politics", "chemistry"),
    ("Iron Man", "{} was first published by", "Marvel", "DC"),
    ("Porsche 911", "{} is produced by", "Porsche", "Toyota"),
    ("Johann Sebastian Bach", "{} composed music in the genre of", "Baroque", "jazz"),
    ("The Louvre", "{} is located in the city of", "Paris", "Tokyo"),
    ("Lionel Messi", "{} plays the sport of", "football", "tennis"),
    ("Windows 95", "{} was developed by", "Microsoft", "Nintendo"),
    ("Mount Kilimanjaro", "{} is located in the country of", "Tanzania", "Norway"),
    ("Angela Merkel", "{} is a member of the political party", "CDU", "Labour"),
)


def builtin_records() -> list[dict[str, Any]]:
    """The built-in facts as records (subject, prompt, new, true)."""
    return [{"subject": s, "prompt": p.format(s), "new": new, "true": true}
            for s, p, true, new in FACTS]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records from a CounterFact file (ROME's or EasyEdit's format)."""
    out = []
    for rec in json.loads(path.read_text()):
        if "requested_rewrite" in rec:
            rw = rec["requested_rewrite"]
            out.append({"subject": rw["subject"], "prompt": rw["prompt"].format(rw["subject"]),
                        "new": rw["target_new"]["str"], "true": rw["target_true"]["str"]})
        else:
            out.append({"subject": rec["subject"], "prompt": rec["prompt"],
                        "new": rec["target_new"], "true": rec["ground_truth"]})
    return out


def requests(records: Sequence[dict[str, Any]], n: int, start: int = 0) -> tuple[EditRequest, ...]:
    """``n`` edit requests from ``records`` (cycling), the first from ``records[start]``."""
    picked = [records[(start + i) % len(records)] for i in range(n)]
    return tuple(EditRequest(name=f"e{start + i}", prompt=r["prompt"], subject=r["subject"],
                             target_new=r["new"], target_old=r["true"])
                 for i, r in enumerate(picked))


def make_unit(model: Any, adapter: Any, *, rows: int = 40, tokens: int = 20, layer: int = 5,
              seed: int = 0) -> Callable[[], None]:
    """One fp32 forward+backward of ``rows × tokens`` random tokens with a δ added to the
    MLP output of ``layer`` (clipped to the model's depth): the benchmark's unit of time."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = torch.randint(0, vocab, (rows, tokens), generator=gen).to(device)
    layer = min(layer, model.config.num_hidden_layers - 1)
    site = adapter.site("mlp_out", layer)
    d_model = int(model.get_output_embeddings().weight.shape[1])

    def unit() -> None:
        delta = torch.zeros(d_model, device=device, requires_grad=True)

        def add(output: Any, _path: str) -> Any:
            return with_hidden(output, hidden_of(output) + delta)

        with Trace(model, site, edit_output=add):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 ids[:, 1:].flatten())
        loss.backward()

    return unit


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    t = _clock(device)
    fn()
    return _clock(device) - t


def measure(ctx: ExecContext, records: Sequence[dict[str, Any]], *, rome_edits: int = 5,
            memit_batch: int = 20, memit_rounds: int = 2, unit_rows: int = 40,
            unit_tokens: int = 20, unit_layer: int = 5, compute: str | None = None,
            log: Callable[[str], None] = lambda _m: None) -> dict[str, float]:
    """Time ROME single edits and MEMIT batches interleaved with units; returns the medians.

    Keys: ``rome_units`` (one ROME edit / unit), ``memit_units_per_edit`` (one MEMIT batch
    / unit / batch size), ``unit_s`` (median unit in seconds), ``rome_s``, ``memit_s``.
    ``compute``: the δ loop's precision (``value.compute``: float32, bfloat16, auto; None:
    the backends' default); the unit stays fp32.
    """
    model = ctx.model
    device = next(model.parameters()).device
    unit = make_unit(model, ctx.adapter, rows=unit_rows, tokens=unit_tokens, layer=unit_layer)
    rome, memit = get_backend("rome"), get_backend("memit")
    rome_layers = default_layers(ctx.facts, rome.info.layer_role).layers
    memit_layers = default_layers(ctx.facts, memit.info.layer_role).layers
    rome_params = rome.default_params(ctx.facts).model_dump(mode="json")
    memit_params = memit.default_params(ctx.facts).model_dump(mode="json")
    if compute is not None:
        rome_params["value"]["compute"] = memit_params["value"]["compute"] = compute

    def rome_step(i: int) -> Callable[[], Any]:
        step = Step(id=f"r{i}", backend="rome", edits=requests(records, 1, i),
                    layers=rome_layers, params=rome_params)
        return lambda: rome.execute(step, ctx)

    def memit_step(i: int) -> Callable[[], Any]:
        step = Step(id=f"m{i}", backend="memit",
                    edits=requests(records, memit_batch, i * memit_batch),
                    layers=memit_layers, params=memit_params)
        return lambda: memit.execute(step, ctx)

    # warm-up, untimed: statistics loaded, prefixes sampled into the temporary cache, kernels
    unit()
    rome_step(len(records) - 1)()
    units: list[float] = [timed(unit, device)]
    rome_r: list[float] = []
    memit_r: list[float] = []
    rome_s: list[float] = []
    memit_s: list[float] = []
    jobs = [("rome", rome_step(i)) for i in range(rome_edits)]
    jobs += [("memit", memit_step(i)) for i in range(memit_rounds)]
    for kind, job in jobs:
        t = timed(job, device)
        units.append(timed(unit, device))
        ratio = t / ((units[-2] + units[-1]) / 2)
        if kind == "rome":
            rome_s.append(t)
            rome_r.append(ratio)
        else:
            memit_s.append(t)
            memit_r.append(ratio / memit_batch)
        log(f"{kind}: {t:.2f} s = {ratio:.2f} units (units around it {units[-2]:.2f} s, "
            f"{units[-1]:.2f} s)")
    return {"rome_units": statistics.median(rome_r) if rome_r else float("nan"),
            "memit_units_per_edit": statistics.median(memit_r) if memit_r else float("nan"),
            "unit_s": statistics.median(units),
            "rome_s": statistics.median(rome_s) if rome_s else float("nan"),
            "memit_s": statistics.median(memit_s) if memit_s else float("nan")}


def last_line(result: dict[str, float]) -> str:
    """The benchmark's last line."""
    return (f"rome_units={result['rome_units']:.3f} "
            f"memit_units_per_edit={result['memit_units_per_edit']:.3f} "
            f"unit_s={result['unit_s']:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rome", type=int, default=5, help="ROME single edits timed")
    ap.add_argument("--memit-batch", type=int, default=20, help="edits per MEMIT batch")
    ap.add_argument("--memit-rounds", type=int, default=2, help="MEMIT batches timed")
    ap.add_argument("--records", type=Path, help="CounterFact file (default: 20 built-in facts)")
    ap.add_argument("--offset", type=int, default=0, help="first record of --records to use")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: kmec's thread policy)")
    ap.add_argument("--compute", choices=("float32", "bfloat16", "auto"),
                    help="precision of the δ loop (default: the backends'; the unit stays fp32)")
    args = ap.parse_args(argv)

    from kmec.models.adapters import adapter_for
    from kmec.models.load import load_model
    from kmec.models.threads import apply_thread_policy
    from kmec.planner.model import StatsRequest
    from kmec.stats import DEFAULT_MAX_LEN, DEFAULT_TOKENS, provider

    if args.threads:  # through the policy, which load_model applies
        os.environ["KMEC_THREADS"] = str(args.threads)
    apply_thread_policy()
    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device)
    adapter = adapter_for(lm.facts.model_type)
    records = builtin_records()
    if args.records:
        n = max(args.memit_batch * args.memit_rounds, args.rome) + 1
        records = read_records(args.records)[args.offset:args.offset + n]
    layers = sorted({*default_layers(lm.facts, "rome").layers,
                     *default_layers(lm.facts, "memit").layers})
    stats = provider(lm.model, lm.tok, lm.facts, adapter,
                     StatsRequest(layers=tuple(layers), tokens=DEFAULT_TOKENS,
                                  max_len=DEFAULT_MAX_LEN))
    for layer in layers:
        stats.second_moment(layer)  # from kmec's cache, or computed now (not timed)
    with tempfile.TemporaryDirectory(prefix="kmec-edit-speed-") as tmp:
        # a fresh cache folder (context prefixes only: weights="" turns the value cache off)
        ctx = ExecContext(model=lm.model, tok=lm.tok, adapter=adapter, facts=lm.facts,
                          stats=stats, cache_dir=Path(tmp), weights="", seed=0)
        print(f"model {args.model} on {args.device}, torch threads {torch.get_num_threads()}, "
              f"{len(records)} records", flush=True)
        result = measure(ctx, records, rome_edits=args.rome, memit_batch=args.memit_batch,
                         memit_rounds=args.memit_rounds, compute=args.compute,
                         log=lambda m: print(m, flush=True))
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))
    print(last_line(result))


if __name__ == "__main__":
    main()
