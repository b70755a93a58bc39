"""Per-sample feature stores: one Zarr v3 group of arrays that share the sample axis.

The store is split by role: its layout on disk, the publish scheme and the helpers both sides share
(`zarr_layout`), the writer (`zarr_writer.StoreWriter`), the reader (`zarr_reader.StoreReader`) and the
verification of published ranges (`zarr_verify`). This module is the one import for users of a store.
"""

from pipeline.stores.zarr_layout import BLOSC_LEVEL, COMPRESSIONS, ENGINES, ArraySpec
from pipeline.stores.zarr_reader import PendingRead, StoreReader
from pipeline.stores.zarr_writer import StoreWriter

__all__ = ["BLOSC_LEVEL", "COMPRESSIONS", "ENGINES", "ArraySpec", "PendingRead", "StoreReader", "StoreWriter"]
