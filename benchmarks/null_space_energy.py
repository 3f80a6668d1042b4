"""How much of each kind of MLP key lies in AlphaEdit's null space (issue #17).

Run: .venv/bin/python benchmarks/null_space_energy.py --data FILE [--n 200] [--offset 1000]
        [--rel 0.02]

AlphaEdit writes its updates only in the directions where the preserved key
statistics C (a generic text corpus) have small eigenvalues (< ``rel`` · λ_max).
An update there moves a key in proportion to the share of that key's energy
that lies in those directions. For each of the planner's AlphaEdit layers this
prints that share for three kinds of key:

* corpus: tr(Ûᵀ C Û) / tr(C), the average over the statistics' own tokens;
* edit keys: the subject's last token of the records' edit prompts;
* neighbour tokens: every token of the records' ``locality_prompt`` (EasyEdit's
  CounterFact format), the prompts the neighbourhood score reads;

and the mean |cosine| between the edit keys and the neighbour tokens inside
the null space (about 1/√r for unrelated directions in r dimensions). The
statistics come from kmec's cache (computed once if missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True,
                    help="CounterFact in EasyEdit's format (counterfact-edit.json)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--rel", type=float, default=1e-2, help="AlphaEdit's null_space_rel")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.data.is_file():
        ap.error(f"--data {args.data}: no such file")
    torch.set_num_threads(args.threads)

    from bench_sequential import sequence_spec

    from kmec.backends import BACKENDS
    from kmec.backends.alphaedit import null_space
    from kmec.backends.keys import compute_keys, prompt_keys
    from kmec.compile import stats_for_step
    from kmec.models.adapters import adapter_for
    from kmec.models.load import load_model
    from kmec.planner import plan as make_plan
    from kmec.planner.model import EditRequest

    records = json.loads(args.data.read_text())[args.offset:args.offset + args.n]
    lm = load_model("smollm2-135m")
    step = make_plan(sequence_spec(records[:1]), lm.facts, backends=BACKENDS).steps[0]
    layers = list(step.layers)
    stats = stats_for_step(step, lm)
    adapter = adapter_for(lm.facts.model_type)
    edits = [EditRequest(name=f"e{i}", prompt=r["prompt"], subject=r["subject"],
                         target_new=r["target_new"]) for i, r in enumerate(records)]
    edit_keys = compute_keys(lm.model, lm.tok, adapter, layers, edits, [""])
    neighbour_keys = prompt_keys(lm.model, lm.tok, adapter, layers,
                                 [r["locality_prompt"] for r in records])
    print(f"{len(records)} records from {args.offset}, null_space_rel {args.rel:g}")
    for layer in layers:
        c = stats.second_moment(layer).double()
        basis, _ = null_space(c.float(), args.rel)
        u = basis.double()

        def share(k: torch.Tensor, u: torch.Tensor = u) -> float:
            k = k.double()
            return float(((k @ u).norm(dim=1) ** 2 / k.norm(dim=1).clamp_min(1e-12) ** 2).mean())

        corpus = float(torch.trace(u.T @ c @ u) / torch.trace(c))
        nk = neighbour_keys[layer][0]
        e = torch.nn.functional.normalize(edit_keys[layer].double() @ u, dim=1)
        nb = torch.nn.functional.normalize(nk.double() @ u, dim=1)
        cos = float((e @ nb.T).abs().mean())
        print(f"layer {layer}: {u.shape[1]} of {u.shape[0]} directions; share of the energy "
              f"in them: corpus {corpus:.2f}, edit keys {share(edit_keys[layer]):.2f}, "
              f"neighbour tokens {share(nk):.2f}; mean |cos| edit vs neighbour "
              f"{cos:.3f} (1/sqrt(r) = {u.shape[1] ** -0.5:.3f})")


if __name__ == "__main__":
    main()
