"""Internal (not public API; docs/reference/api.md): the side commands, which never start training."""
