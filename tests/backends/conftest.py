"""Helpers for the backend tests: an execution context on a tiny model."""

from __future__ import annotations

from kmec.backends.base import ExecContext
from kmec.models.adapters import adapter_for
from kmec.models.facts import facts_from_config
from kmec.models.load import fingerprint_model
from tests.conftest import CorpusStats


def ctx_for(model, tok, layers, tmp_path):
    """An ExecContext on ``model`` with corpus statistics for ``layers``."""
    adapter = adapter_for(model.config.model_type)
    facts = facts_from_config(model.config, name="tiny", fingerprint=fingerprint_model(model))
    return ExecContext(model=model, tok=tok, adapter=adapter, facts=facts,
                       stats=CorpusStats(model, adapter, layers), cache_dir=tmp_path, seed=0)
