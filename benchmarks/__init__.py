"""Benchmarks for partialstore, side by side with Orbax and the raw storage limits.

Scripts, each with ``main(argv) -> int`` (most with ``--quick`` for a smoke run);
the two main ones:

- :mod:`benchmarks.finalize_latency`: finalize time against total bytes,
  number of saves and leaves per save, plus each store's floor.
- :mod:`benchmarks.throughput`: save per call, total save time, finalize,
  load and peak RSS on workloads a-e.

The others: ``lifecycle``, ``multihost``, ``log_scale``, ``load_bytes`` and
``time_to_error`` (see benchmarks/README.md).

Example::

    python -m benchmarks.finalize_latency --quick --stores local --out /tmp/bench
    python -m benchmarks.throughput --quick --stores local,s3,gcs --out /tmp/bench

See ``benchmarks/README.md`` for what each figure means and how it is measured.
"""
