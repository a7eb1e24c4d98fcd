"""Command line: ``partialstore`` (info, verify, gc, discard, demo, bench)."""
