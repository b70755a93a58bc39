"""Image sources and the preprocessing applied at ingest."""
