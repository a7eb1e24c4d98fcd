"""Commit layer: locations, the transaction log, records, manifests, save/finalize/discard/load."""
