"""Where the offline copies of the public corpora are: NMT_TIE_DATA, else ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

from nmt_tie.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """The directory holding multi30k/, wmt/, ptb/, wordsim/ ... (see data/README.md)."""
    configured = os.environ.get("NMT_TIE_DATA")
    root = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        raise UserError(
            f"corpus directory {root} not found: set NMT_TIE_DATA, or fetch the data with "
            "`nmt-tie data fetch multi30k_en_de --dest DIR` and set NMT_TIE_DATA=DIR"
        )
    return root
