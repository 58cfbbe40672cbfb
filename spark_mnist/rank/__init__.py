"""Internal (not public API; docs/reference/api.md): runs in every rank, the loader, its order and the training loop."""
