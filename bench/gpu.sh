#!/usr/bin/env bash
# GPU figures for pretraining: GPT-2 small (124M, context 1024) training tokens/s and MFU with
# bf16 autocast + SDPA (flash) attention + torch.compile, vs HF GPT2LMHeadModel (SDPA, bf16
# autocast, fused AdamW) and vs a nanoGPT-style plain-PyTorch GPT (compiled) in the same run,
# plus ours with one optimisation switched off at a time (bench/train.py's VARIANTS).
#
# The GPU machine has no network and no data mirror, so the data travels with the repo:
#   1. here (a machine with ../shared/data):  bench/gpu.sh --prepare
#      writes .gpu-bench/ (git-ignored): GPT-2's tokenizer and tinyshakespeare's shards, ~1 MB
#   2. there: run `bench/gpu.sh` from the repo root, carrying .gpu-bench (device tool:
#      carry=[".gpu-bench"]). It needs torch, transformers, tiktoken, safetensors, numpy,
#      all in the GPU image. About 4 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu-bench
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--prepare" ]]; then
  DATA=${SCRATCHLLM_DATA_DIR:-../shared/data}
  mkdir -p "$DIR"
  $PY -m scratchllm tokenizer import-gpt2 --encoder-json "$DATA/gpt2-tokenizer/encoder.json" \
    --vocab-bpe "$DATA/gpt2-tokenizer/vocab.bpe" --out "$DIR/gpt2.json"
  SCRATCHLLM_DATA_DIR=$DATA $PY -m scratchllm prepare --data tinyshakespeare \
    --tokenizer "$DIR/gpt2.json" --out "$DIR/data"
  exit 0
fi

[[ -f $DIR/data/meta.json ]] || { echo "no $DIR/data: run bench/gpu.sh --prepare first" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
$PY bench/train.py --device cuda --preset gpt2-small --context 1024 --batch 16 \
  --rounds 1 --steps 10 --warmup 3 \
  --settings hf:bfloat16,nano:bfloat16:compile,ours:bfloat16:compile,ours+unpadded:bfloat16:compile,ours+ce:bfloat16:compile \
  -- --data.shards=$DIR/data --data.tokenizer=$DIR/gpt2.json
# A larger micro-batch: bigger GEMMs for the same model (memory permitting).
$PY bench/train.py --device cuda --preset gpt2-small --context 1024 --batch 32 \
  --rounds 1 --steps 10 --warmup 3 --settings ours:bfloat16:compile \
  -- --data.shards=$DIR/data --data.tokenizer=$DIR/gpt2.json
