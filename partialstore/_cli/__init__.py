"""Command line: ``partialstore demo``."""
