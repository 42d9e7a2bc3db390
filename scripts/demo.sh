#!/usr/bin/env bash
# The demo: build the sample mix, serve it on a loopback mirror, run `prepare` (byte, then
# subword when the dolma2 tokenizer is at ../shared/tokenizers), `inspect`, stop the mirror.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="$here/demo-out"
rm -rf "$out"
mkdir -p "$out"
echo "== building the sample mix"
bolmo-async mirror sample "$out/sample"
tok_args=()
tok_json="$here/../shared/tokenizers/dolma2-tokenizer.json"
if [ -f "$tok_json" ]; then
  mkdir -p "$out/dolma2-tokenizer"
  cp "$tok_json" "$out/dolma2-tokenizer/tokenizer.json"
  echo '{"eos_token": "<|endoftext|>"}' > "$out/dolma2-tokenizer/tokenizer_config.json"
  tok_args=(--model-repo "allenai/dolma2-tokenizer=$out/dolma2-tokenizer")
fi
echo "== starting the mirror"
bolmo-async mirror serve "$out/sample" "${tok_args[@]}" --ready-file "$out/endpoint" > "$out/mirror.log" 2>&1 &
mirror=$!
trap 'kill $mirror 2>/dev/null || true; wait $mirror 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do [ -f "$out/endpoint" ] && break; sleep 0.1; done
endpoint="$(cat "$out/endpoint")"
echo "   endpoint $endpoint"
export HF_HOME="$out/hf-home"   # keep the demo's tokenizer download out of the user's cache
echo "== prepare, byte ids, 10% of the sample"
bolmo-async prepare --output-dir "$out/bolmo_byte" --data-fraction 0.1 --tokenizer byte \
  --max-tokens-per-file 500000 --endpoint "$endpoint" --no-progress
bolmo-async inspect "$out/bolmo_byte" --decode 2
if [ ${#tok_args[@]} -gt 0 ]; then
  echo "== prepare, dolma2 subword ids (what bolmo-core stage 1/2 read), 10% of the sample"
  bolmo-async prepare --output-dir "$out/bolmo_subword" --data-fraction 0.1 --tokenizer subword \
    --endpoint "$endpoint" --no-progress
  bolmo-async inspect "$out/bolmo_subword" --decode 2
else
  echo "(no ../shared/tokenizers/dolma2-tokenizer.json: skipping the subword demo)"
fi
echo "== demo done: outputs under $out"
