"""The kmec version (its own module, so stages can read it without importing the package root)."""

__version__ = "0.1.0"
