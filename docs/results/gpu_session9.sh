#!/usr/bin/env bash
# Session 9's device check, one call: new preference rows (SimPO / ORPO without a reference forward, KTO) beside
# the SFT and DPO baselines on gpt2-124m, DPO with the full float32 logits (--logits-chunk None), and LoRA against
# full fine-tuning on llama-1b. Writes one JSON per part to $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1
B="python3 -m experiments.benchmark --dtype bfloat16 --warmup 1"
timeout 200 $B --preset gpt2-124m --benchmarks sft,dpo,simpo,orpo,kto --steps 8 \
  --json "$OUT/gpt2_pref.json" > "$OUT/gpt2_pref.log" 2>&1; echo "gpt2_pref rc $?" >> "$OUT/gpu.txt"
timeout 70 $B --preset gpt2-124m --benchmarks dpo --steps 8 --logits-chunk None \
  --json "$OUT/gpt2_dpo_nochunk.json" > "$OUT/gpt2_dpo_nochunk.log" 2>&1; echo "nochunk rc $?" >> "$OUT/gpu.txt"
timeout 230 $B --preset llama-1b --benchmarks lora_sft,lora_dpo,sft,dpo --steps 5 --sft-batch 4 --sft-seq 1024 \
  --dpo-pairs 8 --dpo-seq 512 --json "$OUT/llama1b_lora.json" > "$OUT/llama1b_lora.log" 2>&1
echo "llama rc $?" >> "$OUT/gpu.txt"
