"""Runtime layer: the background I/O loop, crash points, cross-process coordination, ordering."""
