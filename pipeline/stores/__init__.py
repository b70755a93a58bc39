"""Where the stages' data lives: WebDataset image shards (`shards`), per-sample Zarr feature stores
written range by range (`zarr_store`), and atomic file publication (`atomic`)."""
