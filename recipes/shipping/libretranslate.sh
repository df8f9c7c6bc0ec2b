#!/usr/bin/env bash
# LibreTranslate serving an nmt-tie model, offline (issue 41): install the package, start the
# server with only that language pair, ask its HTTP API, and screenshot its web page in headless
# Chromium translating the same sentence.
#
# usage: recipes/shipping/libretranslate.sh PACKAGE.argosmodel [OUT_DIR]
#   PACKAGE.argosmodel: nmt-tie export CKPT --to argos --out PACKAGE.argosmodel
#   OUT_DIR (default recipes/shipping/results): libretranslate-api.json, libretranslate.png
#
# LibreTranslate pins its own dependencies (flask 2.2, numpy<2, packaging 23.1, argos-translate-lt,
# a fork of argostranslate): it gets a virtualenv of its own (LT_VENV, default
# .venv-libretranslate), with PyTorch 2.13's CPU build first (its stanza asks for torch) and
# spaCy for the package's offline sentence splitter. The screenshot needs Node.js and Debian's
# chromium (apt-get install chromium); playwright-core is installed beside this script.
set -euo pipefail
PACKAGE=$(realpath "$1")
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(realpath -m "${2:-$HERE/results}")
LT_VENV=${LT_VENV:-.venv-libretranslate}
PORT=${PORT:-5055}
TEXT=${TEXT:-A man in a blue shirt is riding a bicycle down the street.}
mkdir -p "$OUT"

if [ ! -x "$LT_VENV/bin/libretranslate" ]; then
  python3 -m venv "$LT_VENV"
  "$LT_VENV/bin/pip" install --quiet torch==2.13.0
  "$LT_VENV/bin/pip" install --quiet libretranslate==1.9.6 spacy "rich<13"
fi

# a throwaway home: the package is installed there, nothing touches ~/.local
WORK=$(mktemp -d)
export HOME=$WORK ARGOS_PACKAGES_DIR=$WORK/packages ARGOS_CHUNK_TYPE=SPACY
"$LT_VENV/bin/python" -c "import argostranslate.package as p, sys; p.install_from_path(sys.argv[1])" "$PACKAGE"

"$LT_VENV/bin/libretranslate" --load-only en,de --host 127.0.0.1 --port "$PORT" \
  --disable-files-translation > "$WORK/libretranslate.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
# offline, LibreTranslate first tries (and fails) to update its package index: about a minute
for _ in $(seq 300); do
  curl -s -o /dev/null "http://127.0.0.1:$PORT/languages" && break
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/libretranslate.log"; exit 1; }
  sleep 1
done

echo "+ curl -X POST http://127.0.0.1:$PORT/translate -d '{\"q\": \"$TEXT\", \"source\": \"en\", \"target\": \"de\"}'"
curl -s -X POST "http://127.0.0.1:$PORT/translate" -H "Content-Type: application/json" \
  -d "{\"q\": \"$TEXT\", \"source\": \"en\", \"target\": \"de\"}" | tee "$OUT/libretranslate-api.json"
echo

if [ ! -d "$HERE/node_modules/playwright-core" ]; then
  (cd "$HERE" && npm install --silent --no-save playwright-core@1)
fi
QUERY=$(python3 -c "import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))" "$TEXT")
node "$HERE/screenshot.mjs" "http://127.0.0.1:$PORT/?source=en&target=de&q=$QUERY" "$OUT/libretranslate.png"
echo "screenshot: $OUT/libretranslate.png"
