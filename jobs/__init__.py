"""The pipeline stages, one module each, and the `repa` command."""
