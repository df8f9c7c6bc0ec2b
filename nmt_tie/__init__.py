"""nmt-tie: neural machine translation with tied input and output embeddings."""

__version__ = "0.1.0"
