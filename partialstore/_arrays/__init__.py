"""Array layer: array descriptors, dtypes, packing of small arrays, zarr3 through a Backend."""
