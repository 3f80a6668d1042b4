"""Verification: check a spec's claims on the base and edited models.

Contents:
    verify()         Spec + Plan + base/edited models -> Report
    Report           the report model (JSON-serialisable, deterministic)
    write_reports()  report.json, junit.xml, report.md, report.html

Modules: ``claims`` (claims -> probes), ``scoring`` (batched scoring),
``decode`` (perplexity, greedy continuations), ``canaries`` (held-out text,
general questions), ``strategies`` (hypothesis neighbourhoods), ``metrics``
(the formulas), ``evaluate`` / ``extras`` (claim evaluation, audit, partial
applications), ``runner`` (orchestration), ``report`` / ``render`` (+
``templates/``). Verifying a build directory is a workflow:
:func:`kmec.pipeline.verify_build`. This package imports neither the backends
nor the compiler.
"""

from __future__ import annotations

from kmec.verify.render import write_reports
from kmec.verify.report import Report
from kmec.verify.runner import verify

__all__ = ["Report", "verify", "write_reports"]
