#!/usr/bin/env bash
# WMT15 English-German, the paper's attention RNN: untied, decoder-tied and three-way tied.
# usage: recipes/wmt15_en_de/run.sh [data] [train] [eval] | all   (see recipes/wmt.sh and README.md)
CORPUS=wmt15_en_de SRC=en TGT=de ARCH=rnn
VOCAB=${VOCAB:-90000}  # joint BPE, about the paper's 89,500 merges
MAX_LEN=${MAX_LEN:-80}  # training pairs up to 80 pieces (Nematus: 50 words)
VALID=${VALID:-newstest2013} TESTS=${TESTS:-newstest2014 newstest2015} BEAM=${BEAM:-12} LENPEN=${LENPEN:-1.0}
source "$(dirname "$0")/../wmt.sh"
