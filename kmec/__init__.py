"""kmec: a declarative compiler for knowledge edits of language models.

The library API is a handful of verbs over typed values; see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

from kmec.errors import KmecError  # noqa: E402

__all__ = ["KmecError", "__version__"]
