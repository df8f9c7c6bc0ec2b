"""nmt-tie: neural machine translation with tied input and output embeddings."""

import os

__version__ = "0.1.0"

# oneDNN (bf16 matrix products on CPUs) builds kernels for each tensor shape, about 5 ms
# and up to a few MB each, and keeps 1,024 of them by default. Training and decoding keep
# their shapes on a ladder (data/batching.py), but one epoch of the Multi30k recipe still
# needs about 2,000 kernels: with the default the cache evicts and rebuilds kernels every
# update, and the memory of evicted kernels is not given back (RSS grows for the whole run).
# Set before torch first uses oneDNN (read once); a user's own setting wins.
ONEDNN_CACHE_CAPACITY = 8192
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
