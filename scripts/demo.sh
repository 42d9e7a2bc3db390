#!/usr/bin/env bash
# The demo: build the sample mix, serve it on a loopback mirror, run `prepare` in byte mode and in
# subword mode, `inspect` each, stop the mirror. Subword mode uses the real dolma2 tokenizer when
# ../shared/tokenizers/dolma2-tokenizer.json is there, else a small BPE trained on the sample.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="$here/demo-out"
rm -rf "$out"
mkdir -p "$out"
echo "== building the sample mix"
bolmo-async mirror sample "$out/sample"
tok_json="$here/../shared/tokenizers/dolma2-tokenizer.json"
mkdir -p "$out/tokenizer-repo"
if [ -f "$tok_json" ]; then
  cp "$tok_json" "$out/tokenizer-repo/tokenizer.json"
  echo '{"eos_token": "<|endoftext|>"}' > "$out/tokenizer-repo/tokenizer_config.json"
  tok_id="allenai/dolma2-tokenizer"
  echo "   subword mode: the dolma2 tokenizer from $tok_json"
else
  bolmo-async mirror demo-tokenizer "$out/sample" "$out/tokenizer-repo"
  tok_id="demo/sample-bpe"
  echo "   subword mode: no $tok_json here, so a small BPE trained on the sample stands in;"
  echo "   a real run downloads allenai/dolma2-tokenizer from the Hub (the default --tokenizer-identifier)"
fi
echo "== starting the mirror"
bolmo-async mirror serve "$out/sample" --model-repo "$tok_id=$out/tokenizer-repo" \
  --ready-file "$out/endpoint" > "$out/mirror.log" 2>&1 &
mirror=$!
trap 'kill $mirror 2>/dev/null || true; wait $mirror 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -f "$out/endpoint" ] && break; sleep 0.1; done
endpoint="$(cat "$out/endpoint")"
echo "   endpoint $endpoint"
echo "== prepare, byte ids, 10% of the sample"
bolmo-async prepare --output-dir "$out/bolmo_byte" --data-fraction 0.1 --tokenizer byte \
  --max-tokens-per-file 500000 --endpoint "$endpoint"
bolmo-async inspect "$out/bolmo_byte" --decode 2
echo "== prepare, subword ids ($tok_id; dolma2 ids are what bolmo-core stage 1/2 read), 10% of the sample"
bolmo-async prepare --output-dir "$out/bolmo_subword" --data-fraction 0.1 --tokenizer subword \
  --tokenizer-identifier "$tok_id" --endpoint "$endpoint"
bolmo-async inspect "$out/bolmo_subword" --decode 2
echo "== demo done: outputs under $out (sample/: the generated mix; bolmo_byte/, bolmo_subword/: shards and data_sources.txt)"
venv_bin="$(dirname "$(command -v bolmo-async)")"
echo "   the tool is installed in $(dirname "$venv_bin"), not on your PATH: run"
echo "     $venv_bin/bolmo-async --help"
echo "   or first: source $venv_bin/activate"
echo "   next: the README's \"Try the commands yourself, offline\" serves a sample for your own commands"
