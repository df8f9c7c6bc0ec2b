#!/usr/bin/env bash
# GPU smoke test, the first step on a machine with a GPU (under 5 minutes on one): trains the
# small Multi30k Transformer and RNN in bf16 and fp16, kills and resumes each, checks that
# tying survives, translates 100 sentences, prints updates/s and peak GPU memory.
# usage: recipes/benchmarks/gpu_smoke.sh [--updates 200] [--dtypes bf16,fp16] [--archs ...]
# The corpora come from ../shared/data or NMT_TIE_DATA (see `nmt-tie data fetch multi30k_en_de`).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_smoke.py" "$@"
