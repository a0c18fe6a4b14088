#!/usr/bin/env bash
# The GPU checks in one call, for a lent single-GPU machine (benchmarks/README.md, "GPU mode"):
#   1. the machine (nvidia-smi, python, torch);
#   2. the TTBC study's GPU mode: talkingmachines-18b at 512x512 in bf16 on random weights, case 1 (cases 2-4
#      need more GPUs and are skipped with the reason) and the chunk {3,7} x steps {2,4} ablation, through
#      run's rank entry, i.e. the engine serve uses (per-forward time, TTBC, and per rank the memory plan's
#      figure beside torch.cuda.max_memory_allocated: results.json "peak_memory");
#   3. decode time per chunk, the Wan VAE vs the taew2.1 fast decoder (--vae-decoder taew2.1; random weights,
#      the same latents, per latent and whole chunk; benchmarks/vae_decode.py) at the same size and dtype;
#   4. the CUDA tests (pytest -m gpu): bf16 VAE decode (Wan and taew2.1) on a side stream, the compiled
#      decode step, pinned host-to-device staging of the per-chunk tensors, and
#      `talkingmachines run` on the GPU (overlapped and serial) against the CPU.
# Each step has its own time limit and writes what it has under $OUT (the TTBC study rewrites
# results.partial.json after every run). Python packages the machine lacks come as wheels in .whl/.
#
#   TM_COMMIT=$(git rev-parse HEAD) OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Knobs for a dry run on a CPU: PRESET=tiny RES=64x64 DEVICE=cpu DTYPE=fp32 CHUNKS=4 (VAE_CHUNKS, VAE_LIMIT:
# the decode comparison's chunks and time limit).
set -u
OUT=${OUT:-/tmp/gpu_check}
PRESET=${PRESET:-talkingmachines-18b}
RES=${RES:-512}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
CHUNKS=${CHUNKS:-8}
PY=${PY:-python3}
TTBC_LIMIT=${TTBC_LIMIT:-330}
TEST_LIMIT=${TEST_LIMIT:-150}
VAE_LIMIT=${VAE_LIMIT:-90}
VAE_CHUNKS=${VAE_CHUNKS:-5}
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

TTBC_DIR=/tmp/ttbc_gpu_check
rm -rf "$TTBC_DIR"
log "ttbc: $PRESET $RES $DTYPE on $DEVICE, $CHUNKS chunks, limit ${TTBC_LIMIT}s"
timeout "$TTBC_LIMIT" "$PY" -m benchmarks.ttbc --preset "$PRESET" --cases 1,2,3,4 --chunks "$CHUNKS" \
    --out "$TTBC_DIR" --resolution "$RES" --dtype "$DTYPE" --device "$DEVICE" --steps 2 --ablation \
    > "$OUT/ttbc.txt" 2>&1
log "ttbc rc=$?"
for f in results.json results.partial.json ttbc.png ablation.png; do
    [ -f "$TTBC_DIR/$f" ] && cp "$TTBC_DIR/$f" "$OUT/ttbc_$f"
done
tail -n 30 "$OUT/ttbc.txt"

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

log "pytest -m gpu, limit ${TEST_LIMIT}s"
timeout "$TEST_LIMIT" "$PY" -m pytest -q -s -m gpu -p no:cacheprovider tests/decoder/test_vae_streaming.py tests/proto/test_staging.py \
    tests/decoder/test_taehv.py \
    tests/runtime/test_cuda_run.py > "$OUT/pytest.txt" 2>&1
log "pytest rc=$?"
tail -n 15 "$OUT/pytest.txt"
log done
