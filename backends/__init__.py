"""Built-in storage backends, one module per store (installed as ``partialstore.backends``).

The core never imports these modules by name: :mod:`partialstore.registry`
maps URL schemes to them and imports each on first use.
"""
