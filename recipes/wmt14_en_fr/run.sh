#!/usr/bin/env bash
# WMT14 English-French, the paper's attention RNN: untied, decoder-tied and three-way tied.
# usage: recipes/wmt14_en_fr/run.sh [data] [train] [eval] | all   (see recipes/wmt.sh and README.md)
CORPUS=wmt14_en_fr SRC=en TGT=fr ARCH=rnn
VOCAB=${VOCAB:-90000}  # joint BPE, about the paper's 89,500 merges
MAX_LEN=${MAX_LEN:-80}
VALID=${VALID:-newstest2013} TESTS=${TESTS:-newstest2014} BEAM=${BEAM:-12} LENPEN=${LENPEN:-1.0}
source "$(dirname "$0")/../wmt.sh"
