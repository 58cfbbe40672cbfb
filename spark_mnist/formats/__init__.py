"""Internal (not public API; docs/reference/api.md): pure parsing of the source formats (IDX, Keras npz)."""
