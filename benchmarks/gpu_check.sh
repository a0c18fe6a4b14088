#!/usr/bin/env bash
# The GPU checks in one call of under ten minutes, for a lent single-GPU machine (benchmarks/README.md,
# "GPU mode"). In order of value, each step with its own time limit (the limits add up to 580 s), each
# writing what it has under $OUT even when its limit cuts it short:
#   1. the machine (nvidia-smi, python, torch);
#   2. the per-forward time of one DiT pass per variant (benchmarks/forward_speed.py: eager, each attention
#      backend present, CUDA graphs, compiled, compiled+graphs; forward_speed.json, rewritten after every
#      variant) at $PRESET $RES $DTYPE;
#   3. FP8 (only where the GPU has FP8 matrix products, sm_89+; skipped with the reason elsewhere):
#      python -m workers.fp8_check, bf16 against --fp8 linear (per-forward time of both, the latents'
#      max/relative-L2 difference; fp8_linear.json), and with FP8_KV=1 --kv-cache-dtype fp8 too;
#   4. decode time per chunk, the Wan VAE vs the taew2.1 fast decoder (--vae-decoder taew2.1; random weights,
#      the same latents, per latent and whole chunk; benchmarks/vae_decode.py) at the same size and dtype;
#   5. the TTBC study's GPU mode: $PRESET at $RES in $DTYPE on random weights, case 1 (cases 2-4 need more
#      GPUs and are skipped with the reason) and the chunk {3,7} x steps {2,4} ablation, through run's rank
#      entry, i.e. the engine serve uses (per-forward time, TTBC, and per rank the memory plan's figure beside
#      torch.cuda.max_memory_allocated: results.json "peak_memory");
#   6. case 1 (self-contained, one GPU) again with the speed options together, $BEST_FLAGS (default: CUDA
#      graphs, FP8 linears where the card has them, the taew2.1 decoder): the TTBC of the best combination
#      the options offer, beside step 5's default one (ttbc_best_results.json);
#   7. the CUDA tests (pytest -m gpu): bf16 VAE decode (Wan and taew2.1) on a side stream, the compiled
#      decode step, pinned host-to-device staging of the per-chunk tensors, and
#      `talkingmachines run` on the GPU (overlapped and serial) against the CPU.
# Each step has its own time limit and writes what it has under $OUT (the TTBC study rewrites
# results.partial.json after every run). Python packages the machine lacks come as wheels in .whl/.
#
#   TM_COMMIT=$(git rev-parse HEAD) OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Knobs for a dry run on a CPU: PRESET=tiny RES=64x64 DEVICE=cpu DTYPE=fp32 CHUNKS=4; each step's limit
# (FWD_LIMIT, FP8_LIMIT, VAE_LIMIT, TTBC_LIMIT, BEST_LIMIT, TEST_LIMIT), FWD_VARIANTS/FWD_ITERS, FP8_KV=1,
# VAE_CHUNKS, BEST_FLAGS (the group options of step 6's run).
set -u
OUT=${OUT:-/tmp/gpu_check}
PRESET=${PRESET:-talkingmachines-18b}
RES=${RES:-512}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
CHUNKS=${CHUNKS:-8}
PY=${PY:-python3}
FWD_LIMIT=${FWD_LIMIT:-110}
FWD_VARIANTS=${FWD_VARIANTS:-all}
FWD_ITERS=${FWD_ITERS:-10}
FP8_LIMIT=${FP8_LIMIT:-80}
FP8_KV=${FP8_KV:-0}
VAE_LIMIT=${VAE_LIMIT:-50}
VAE_CHUNKS=${VAE_CHUNKS:-5}
TTBC_LIMIT=${TTBC_LIMIT:-170}
BEST_LIMIT=${BEST_LIMIT:-110}
TEST_LIMIT=${TEST_LIMIT:-60}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*"; }

if [ -d .whl ] && ! "$PY" -c "import av, soundfile, pydantic" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

{
    nvidia-smi 2>&1 || true
    "$PY" -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} > "$OUT/env.txt" 2>&1
log "machine: $(tail -1 "$OUT/env.txt")"

log "forward speed: $PRESET $RES $DTYPE on $DEVICE, variants $FWD_VARIANTS, limit ${FWD_LIMIT}s"
timeout "$FWD_LIMIT" "$PY" -m benchmarks.forward_speed --preset "$PRESET" --resolution "$RES" --dtype "$DTYPE" \
    --device "$DEVICE" --variants "$FWD_VARIANTS" --iters "$FWD_ITERS" \
    --out "$OUT/forward_speed.json" > "$OUT/forward_speed.txt" 2>&1
log "forward speed rc=$?"
tail -n 12 "$OUT/forward_speed.txt"
FP8_SUPPORT=$("$PY" -c "from workers.fp8 import fp8_supported; ok, why = fp8_supported('$DEVICE'); \
print(('yes: ' if ok else 'no: ') + why)" 2>&1 | tail -1)
if [ "${FP8_SUPPORT%%:*}" = yes ]; then
    log "fp8: $PRESET $RES on $DEVICE (${FP8_SUPPORT#yes: }), limit ${FP8_LIMIT}s"
    timeout "$FP8_LIMIT" "$PY" -m workers.fp8_check --preset "$PRESET" --resolution "$RES" --device "$DEVICE" \
        --chunks 5 --fp8 linear --mode scaled_mm --json "$OUT/fp8_linear.json" > "$OUT/fp8.txt" 2>&1
    log "fp8 linear rc=$?"
    if [ "$FP8_KV" = 1 ]; then
        timeout "$FP8_LIMIT" "$PY" -m workers.fp8_check --preset "$PRESET" --resolution "$RES" \
            --device "$DEVICE" --chunks 3 --fp8 linear --kv-cache-dtype fp8 --mode scaled_mm \
            --json "$OUT/fp8_linear_kv.json" >> "$OUT/fp8.txt" 2>&1
        log "fp8 linear + kv cache rc=$?"
    fi
    tail -n 20 "$OUT/fp8.txt"
else
    log "fp8: skipped, no FP8 matrix products here (${FP8_SUPPORT#no: })"
    echo "skipped: ${FP8_SUPPORT}" > "$OUT/fp8.txt"
fi

if [[ $RES == *x* ]]; then VAE_H=${RES%x*}; VAE_W=${RES#*x}; else VAE_H=$RES; VAE_W=$RES; fi
VAE_PRESET=$("$PY" -c "from proto.vae_config import vae_preset_for; print(vae_preset_for('$PRESET'))")
VAE_AUTOCAST=$([ "$DTYPE" = bf16 ] && echo bfloat16 || echo none)
log "vae decode: Wan VAE ($VAE_PRESET) vs taew2.1 at ${VAE_H}x${VAE_W} on $DEVICE ($VAE_AUTOCAST), \
$VAE_CHUNKS chunks, limit ${VAE_LIMIT}s"
timeout "$VAE_LIMIT" "$PY" -m benchmarks.vae_decode --preset "$VAE_PRESET" --height "$VAE_H" --width "$VAE_W" \
    --chunks "$VAE_CHUNKS" --decoders wan2.1,taew2.1 --device "$DEVICE" --autocast "$VAE_AUTOCAST" \
    --out "$OUT/vae_decode_taew2_1.json" > "$OUT/vae_decode.txt" 2>&1
log "vae decode rc=$?"
tail -n 8 "$OUT/vae_decode.txt"

TTBC_DIR=$(mktemp -d /tmp/ttbc_gpu_check.XXXXXX)
log "ttbc: $PRESET $RES $DTYPE on $DEVICE, $CHUNKS chunks, limit ${TTBC_LIMIT}s"
timeout "$TTBC_LIMIT" "$PY" -m benchmarks.ttbc --preset "$PRESET" --cases 1,2,3,4 --chunks "$CHUNKS" \
    --out "$TTBC_DIR" --resolution "$RES" --dtype "$DTYPE" --device "$DEVICE" --steps 2 --ablation \
    > "$OUT/ttbc.txt" 2>&1
log "ttbc rc=$?"
for f in results.json results.partial.json ttbc.png ablation.png; do
    [ -f "$TTBC_DIR/$f" ] && cp "$TTBC_DIR/$f" "$OUT/ttbc_$f"
done
tail -n 30 "$OUT/ttbc.txt"

if [ -z "${BEST_FLAGS+x}" ]; then
    BEST_FLAGS="--cuda-graphs --vae-decoder taew2.1"
    [ "$DEVICE" = cpu ] && BEST_FLAGS="--vae-decoder taew2.1"  # CUDA graphs are refused on a CPU
    [ "${FP8_SUPPORT%%:*}" = yes ] && [ "$DTYPE" = bf16 ] && BEST_FLAGS="$BEST_FLAGS --fp8 linear"
fi
BEST_DIR=$(mktemp -d /tmp/ttbc_best.XXXXXX)
log "ttbc best combination: case 1 with '$BEST_FLAGS', limit ${BEST_LIMIT}s"
timeout "$BEST_LIMIT" "$PY" -m benchmarks.ttbc --preset "$PRESET" --cases 1 --chunks "$CHUNKS" --out "$BEST_DIR" \
    --resolution "$RES" --dtype "$DTYPE" --device "$DEVICE" --steps 2 --no-plots --run-flags "$BEST_FLAGS" \
    > "$OUT/ttbc_best.txt" 2>&1
log "ttbc best rc=$?"
for f in results.json results.partial.json; do
    [ -f "$BEST_DIR/$f" ] && cp "$BEST_DIR/$f" "$OUT/ttbc_best_$f"
done
tail -n 8 "$OUT/ttbc_best.txt"

log "pytest -m gpu, limit ${TEST_LIMIT}s"
timeout "$TEST_LIMIT" "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/decoder/test_vae_streaming.py tests/proto/test_staging.py \
    tests/decoder/test_taehv.py \
    tests/runtime/test_cuda_run.py > "$OUT/pytest.txt" 2>&1
log "pytest rc=$?"
tail -n 15 "$OUT/pytest.txt"
log done
