"""Internal (not public API; docs/reference/api.md): runs once on the Spark driver or the Spark Connect client: the
ingest's reading, checking, planning and write jobs, and the session seam."""
