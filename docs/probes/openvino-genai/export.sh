#!/bin/bash
# Convert demo-llm-58m to OpenVINO IR (fp32 weights, no compression) + tokenizer/detokenizer.
set -e
cd /tmp/ovgenai
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
OUT=${OUT:-ov/demo-llm-58m}
rm -rf "$OUT"
/usr/bin/time -v venv-export/bin/optimum-cli export openvino \
  --model models/demo-llm-58m --task text-generation-with-past \
  --weight-format fp32 --disable-convert-tokenizer \
  "$OUT" > logs/export${TAG}.log 2>&1
echo "export rc=$?"
# tokenizer/detokenizer explicitly with openvino-tokenizers
/usr/bin/time -v venv-export/bin/convert_tokenizer models/demo-llm-58m --with-detokenizer \
  -o "$OUT" > logs/tokenizer${TAG}.log 2>&1
echo "tokenizer rc=$?"
ls -la "$OUT"
