# Shared stages of the WMT recipes; each recipe's run.sh sets its variables and sources this.
#
#   data   nmt-tie data fetch CORPUS (needs the internet, or MIRROR=URL), then nmt-tie prepare;
#          with CORPUS_DIR, prepare from a local directory instead (nothing is downloaded)
#   train  torchrun ... -m nmt_tie train ARCH-TIE.yaml for every tying mode in TIES
#   eval   translate every test set with beam search, score with sacrebleu, nmt-tie compare
#   all    the three in order (the default); several stages may be given: data train eval
#
# Environment: CORPORA (downloads, default corpora/), RUNS (default runs/CORPUS), GPUS per node
# (default 1: one process, no launcher; more, or TORCHRUN_ARGS: torchrun), TORCHRUN_ARGS (e.g.
# "--nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint host0:29500" for several nodes),
# TIES (default "none decoder all"), OVERRIDES (extra key=value config overrides), NMT_TIE
# (default nmt-tie), TORCHRUN (default torchrun), MIRROR, EVAL_DTYPE (precision of the final
# translations, default fp32),
# LENGTH_NORM (average | gnmt), VALID and TESTS (set names), VOCAB, MAX_LEN, BEAM, LENPEN.
# A local corpus: CORPUS_DIR (a directory of NAME.SRC and NAME.TGT files, gzip or not) and
# TRAIN_SETS (the names in it to train on, concatenated; default "train"), e.g. the news test
# sets of ../shared/data/wmt (recipe READMEs: "A run on local news text").
set -euo pipefail

if [[ ${#BASH_SOURCE[@]} -lt 2 || -z ${CORPUS:-} ]]; then
  echo "recipes/wmt.sh holds the stages a WMT recipe shares: run a recipe's run.sh, e.g. recipes/wmt14_en_fr/run.sh" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
CORPUS_DIR=${CORPUS_DIR:-}
TRAIN_SETS=${TRAIN_SETS:-train}
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

# Training runs as a child that this script waits for, passing on a SIGTERM or SIGINT sent to
# the script alone: docker stop and Kubernetes signal only a container's first process, which
# is often this script, and bash would neither pass the signal on nor (as PID 1) die of it. The
# trainer saves and stops; the script then exits with its status (143 or 130, which requeueing
# schedulers read).
say_forwarding_signals() {
  echo "+ $*" >&2
  "$@" &
  local child=$! status
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM
  trap 'kill -INT "$child" 2>/dev/null || true' INT
  while true; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break # else a trapped signal ended the wait, not the child
  done
  trap - TERM INT
  return "$status"
}

# The directory holding the sets (train, VALID, TESTS) as NAME.LANG or NAME.LANG.gz.
sets_dir() { if [ -n "$CORPUS_DIR" ]; then echo "$CORPUS_DIR"; else echo "$CORPORA/$CORPUS"; fi; }

# The file of one set and language, gzip-compressed or not.
set_file() {
  local dir; dir=$(sets_dir)
  if [ -e "$dir/$1.$2" ]; then echo "$dir/$1.$2"; else echo "$dir/$1.$2.gz"; fi
}

stage_data() {
  local sets train
  sets=$(sets_dir) train="$sets/train"
  if [ -z "$CORPUS_DIR" ]; then
    say $NMT_TIE data fetch "$CORPUS" --dest "$CORPORA" ${MIRROR:+--mirror "$MIRROR"}
  elif [ "$TRAIN_SETS" != train ]; then
    # several local sets: their concatenation is the training data
    train="$RUNS/corpus/train"
    mkdir -p "$RUNS/corpus"
    for lang in "$SRC" "$TGT"; do
      local files=()
      for name in $TRAIN_SETS; do files+=("$(set_file "$name" "$lang")"); done
      echo "+ zcat -f ${files[*]} | gzip > $train.$lang.gz" >&2
      zcat -f "${files[@]}" | gzip > "$train.$lang.gz.tmp" && mv "$train.$lang.gz.tmp" "$train.$lang.gz"
    done
  fi
  local tests=()
  for name in $TESTS; do tests+=("$sets/$name"); done
  say $NMT_TIE prepare --src "$SRC" --tgt "$TGT" --train "$train" \
    --valid "$sets/$VALID" --test "${tests[@]}" --out "$RUNS/data" \
    --vocab-size "$VOCAB" --max-len "$MAX_LEN"
}

stage_train() {
  for tie in $TIES; do
    local train=(train "$HERE/$ARCH-$tie.yaml" data="$RUNS/data" save_dir="$RUNS/$ARCH-$tie")
    if [ "$GPUS" = 1 ] && [ -z "${TORCHRUN_ARGS:-}" ]; then
      # one process needs no launcher: the job script gets nmt-tie's own exit status (143 after a
      # SIGTERM, 2 and one line for a bad input) instead of torchrun's 1 and its report
      # shellcheck disable=SC2086  # OVERRIDES is a word list
      say_forwarding_signals $NMT_TIE "${train[@]}" $OVERRIDES
    else
      # shellcheck disable=SC2086  # OVERRIDES and TORCHRUN_ARGS are word lists
      say_forwarding_signals $TORCHRUN --nproc_per_node "$GPUS" ${TORCHRUN_ARGS:-} -m nmt_tie "${train[@]}" $OVERRIDES
    fi
  done
}

stage_eval() {
  local runs=()
  for tie in $TIES; do
    local run="$RUNS/$ARCH-$tie" checkpoint="$RUNS/$ARCH-$tie/best.pt"
    runs+=("$run")
    if [ "$AVERAGE" = 1 ]; then
      if ! compgen -G "$run/checkpoint_*.pt" > /dev/null; then
        echo "$run has no numbered checkpoints to average: run the train stage first" >&2
        exit 2
      fi
      say $NMT_TIE average "$run"/checkpoint_*.pt -o "$run/averaged.pt"
      checkpoint="$run/averaged.pt"
    fi
    for name in $TESTS; do
      say $NMT_TIE translate -c "$checkpoint" -i "$(set_file "$name" "$SRC")" -o "$run/$name.hyp" \
        --beam "$BEAM" --lenpen "$LENPEN" --length-norm "$LENGTH_NORM" --dtype "$EVAL_DTYPE"
      say $NMT_TIE score "$run/$name.hyp" "$(set_file "$name" "$TGT")" --out "$run/$name.score.json"
    done
  done
  say $NMT_TIE compare "${runs[@]}" -o "$RUNS/report.md" --plot "$RUNS/report.png"
}

if ! [[ $GPUS =~ ^[1-9][0-9]*$ ]]; then
  echo "GPUS=$GPUS: give the number of GPUs per node (1, 2, ...)" >&2
  exit 2
fi
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(all)
for stage in "${stages[@]}"; do
  case "$stage" in
    data | train | eval | all) ;;
    *) echo "usage: $0 [data] [train] [eval] | all" >&2; exit 2 ;;
  esac
done
for stage in "${stages[@]}"; do
  case "$stage" in
    data) stage_data ;;
    train) stage_train ;;
    eval) stage_eval ;;
    all) stage_data; stage_train; stage_eval ;;
  esac
done
