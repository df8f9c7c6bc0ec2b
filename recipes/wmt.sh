# Shared stages of the WMT recipes; each recipe's run.sh sets its variables and sources this.
#
#   data   nmt-tie data fetch CORPUS (needs the internet, or MIRROR=URL), then nmt-tie prepare
#   train  torchrun ... -m nmt_tie train ARCH-TIE.yaml for every tying mode in TIES
#   eval   translate every test set with beam search, score with sacrebleu, nmt-tie compare
#   all    the three in order (the default)
#
# Environment: CORPORA (downloads, default corpora/), RUNS (default runs/CORPUS), GPUS per node
# (default 1), TORCHRUN_ARGS (e.g. "--nnodes 2 --node_rank 0 --rdzv_backend c10d
# --rdzv_endpoint host0:29500" for several nodes), TIES (default "none decoder all"),
# OVERRIDES (extra key=value config overrides), NMT_TIE (default nmt-tie), MIRROR,
# EVAL_DTYPE (precision of the final translations, default fp32), LENGTH_NORM (average | gnmt).
set -euo pipefail

if [[ ${#BASH_SOURCE[@]} -lt 2 || -z ${CORPUS:-} ]]; then
  echo "recipes/wmt.sh holds the stages a WMT recipe shares: run a recipe's run.sh, e.g. recipes/wmt14_en_fr/run.sh" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
NMT_TIE=${NMT_TIE:-nmt-tie}
TORCHRUN=${TORCHRUN:-torchrun}
CORPORA=${CORPORA:-corpora}
RUNS=${RUNS:-runs/$CORPUS}
GPUS=${GPUS:-1}
TIES=${TIES:-none decoder all}
OVERRIDES=${OVERRIDES:-}
AVERAGE=${AVERAGE:-0}
EVAL_DTYPE=${EVAL_DTYPE:-fp32}  # the precision of the final translations (bf16 or fp16: faster)
LENGTH_NORM=${LENGTH_NORM:-average}  # score / length ** LENPEN (average) or GNMT's (gnmt)

say() { echo "+ $*" >&2; "$@"; }

stage_data() {
  say $NMT_TIE data fetch "$CORPUS" --dest "$CORPORA" ${MIRROR:+--mirror "$MIRROR"}
  local tests=()
  for name in $TESTS; do tests+=("$CORPORA/$CORPUS/$name"); done
  say $NMT_TIE prepare --src "$SRC" --tgt "$TGT" --train "$CORPORA/$CORPUS/train" \
    --valid "$CORPORA/$CORPUS/$VALID" --test "${tests[@]}" --out "$RUNS/data" \
    --vocab-size "$VOCAB" --max-len "$MAX_LEN"
}

stage_train() {
  for tie in $TIES; do
    # shellcheck disable=SC2086  # OVERRIDES and TORCHRUN_ARGS are word lists
    say $TORCHRUN --nproc_per_node "$GPUS" ${TORCHRUN_ARGS:-} -m nmt_tie train "$HERE/$ARCH-$tie.yaml" \
      data="$RUNS/data" save_dir="$RUNS/$ARCH-$tie" $OVERRIDES
  done
}

stage_eval() {
  local runs=()
  for tie in $TIES; do
    local run="$RUNS/$ARCH-$tie" checkpoint="$RUNS/$ARCH-$tie/best.pt"
    runs+=("$run")
    if [ "$AVERAGE" = 1 ]; then
      say $NMT_TIE average "$run"/checkpoint_*.pt -o "$run/averaged.pt"
      checkpoint="$run/averaged.pt"
    fi
    for name in $TESTS; do
      say $NMT_TIE translate -c "$checkpoint" -i "$CORPORA/$CORPUS/$name.$SRC" -o "$run/$name.hyp" \
        --beam "$BEAM" --lenpen "$LENPEN" --length-norm "$LENGTH_NORM" --dtype "$EVAL_DTYPE"
      say $NMT_TIE score "$run/$name.hyp" "$CORPORA/$CORPUS/$name.$TGT" --out "$run/$name.score.json"
    done
  done
  say $NMT_TIE compare "${runs[@]}" -o "$RUNS/report.md" --plot "$RUNS/report.png"
}

case "${1:-all}" in
  data) stage_data ;;
  train) stage_train ;;
  eval) stage_eval ;;
  all) stage_data; stage_train; stage_eval ;;
  *) echo "usage: $0 [data|train|eval|all]" >&2; exit 2 ;;
esac
