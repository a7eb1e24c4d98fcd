"""PyTree layer: key paths, leaf classification and snapshots, flattening and rebuilding trees."""
