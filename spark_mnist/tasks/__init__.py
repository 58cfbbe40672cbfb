"""Internal (not public API; docs/reference/api.md): runs inside Spark tasks on executors; imports neither driver/
nor rank/."""
