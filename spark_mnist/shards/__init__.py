"""Internal (not public API; docs/reference/api.md): the dataset contract, importable anywhere, no Spark, no torch."""
