#!/usr/bin/env bash
# WMT14 English-German, Transformer-base with a shared 32K vocabulary: untied, decoder-tied,
# three-way tied; the last five checkpoints are averaged before testing.
# usage: recipes/wmt14_en_de_transformer/run.sh [data] [train] [eval] | all   (see recipes/wmt.sh)
CORPUS=wmt14_en_de SRC=en TGT=de ARCH=transformer
VOCAB=${VOCAB:-32000}
MAX_LEN=${MAX_LEN:-250}
VALID=${VALID:-newstest2013} TESTS=${TESTS:-newstest2014} BEAM=${BEAM:-4} LENPEN=${LENPEN:-0.6}
LENGTH_NORM=${LENGTH_NORM:-gnmt}  # Vaswani et al.: GNMT's length penalty, alpha 0.6
AVERAGE=${AVERAGE:-1}
source "$(dirname "$0")/../wmt.sh"
