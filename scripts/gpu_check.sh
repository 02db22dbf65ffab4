#!/usr/bin/env bash
# One-shot GPU check: the GPU tests, the render/refine/inference/animation benchmarks on CUDA and an
# NCCL smoke run of the decoder trainer, with every figure written to ONE JSON that names the GPU.
# Meant to finish in < 8 minutes on one GPU, including the venv install from local wheels and
# gsplat's one-off CUDA JIT build (about 1-3 minutes; reused from $TORCH_EXTENSIONS_DIR when warm).
#
#   scripts/gpu_check.sh                              # use the current python (fastavatar installed)
#   WHEELS=/path/to/wheels scripts/gpu_check.sh       # make a clean venv offline from carried wheels
#   OUT=results/gpu_check.json scripts/gpu_check.sh   # where the JSON goes (default outputs/gpu_check/gpu_check.json)
#
# Offline (no network on the GPU box): on a machine with network, in the repo root,
#   pip download -d wheels -r requirements.txt pytest timm onnxruntime-gpu     # + setuptools wheel
# (same Python version and platform as the GPU box; the torch/nvidia wheels are the large part),
# copy wheels/ next to the repo, then run `WHEELS=wheels scripts/gpu_check.sh`: the venv is
# installed with `pip install --no-index --find-links "$WHEELS"`, so nothing is fetched.
#
# Environment knobs: VENV (venv folder to create, default .venv-gpucheck), PYTHON (interpreter
# used when WHEELS is unset), STEP_TIMEOUT (seconds per step, default 150), MAX_JOBS (nvcc jobs).
# Exit status: 0 when every step passed, 1 otherwise; the JSON says which step failed and why.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-outputs/gpu_check/gpu_check.json}
WORK=$(dirname "$OUT")/gpu_check_steps
mkdir -p "$WORK"
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.torch_extensions}   # gsplat's JIT build, kept
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
T0=$(date +%s)
: > "$WORK/steps.tsv"   # name  status  seconds  logfile

step() {  # step NAME TIMEOUT CMD...   runs CMD, logs to $WORK/NAME.log, records status and seconds
  local name=$1 limit=$2; shift 2
  local start=$(date +%s) status=ok rc
  echo "[gpu_check] $name ..."
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    status="failed(rc=$rc)"; [ $rc -eq 124 ] && status="timeout(${limit}s)"
  fi
  local secs=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$WORK/$name.log" >> "$WORK/steps.tsv"
  echo "[gpu_check] $name: $status (${secs}s)"
}

# --- 0. environment -------------------------------------------------------------------------
if [ -n "${WHEELS:-}" ]; then
  VENV=${VENV:-.venv-gpucheck}
  step install 300 bash -c "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q --no-index --find-links '$WHEELS' \
      setuptools wheel -r requirements.txt pytest timm && '$VENV/bin/pip' install -q --no-index --find-links '$WHEELS' --no-build-isolation \
      --no-deps -e . && { '$VENV/bin/pip' uninstall -y -q onnxruntime; '$VENV/bin/pip' install -q --no-index \
      --find-links '$WHEELS' --no-deps onnxruntime-gpu || true; }"
  PY="$REPO/$VENV/bin/python"
else
  PY=${PYTHON:-python}
fi
step environment 60 "$PY" - "$WORK/environment.json" <<'EOF'
import json, subprocess, sys
import torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                nccl=".".join(map(str, torch.cuda.nccl.version())))
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    info["driver"] = f"nvidia-smi failed: {exc}"
from fastavatar.runtime import versions
info["versions"] = versions()
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
sys.exit(0 if info["cuda_available"] else 1)
EOF
if ! grep -q $'^environment\tok' "$WORK/steps.tsv"; then
  # no usable CUDA device: stop here rather than let the benchmarks fall back to the CPU
  SKIP_ALL=1
fi
CAP=$("$PY" -c "import torch; p=torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')" 2>/dev/null || echo "")
[ -n "$CAP" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

if [ -z "${SKIP_ALL:-}" ]; then
# --- 1. gsplat's CUDA extension (JIT build on first use; --backend gsplat fails instead of falling back)
step gsplat_build 400 "$PY" - <<'EOF'
import time, torch
from fastavatar.render import render_splats
t = time.perf_counter()
n = 64
splats = {"means": torch.randn(n, 3, device="cuda") * 0.05 + torch.tensor([0, 0, 1.0], device="cuda"),
          "quats": torch.nn.functional.normalize(torch.randn(n, 4, device="cuda"), dim=-1),
          "scales": torch.full((n, 3), -4.0, device="cuda"), "opacities": torch.zeros(n, device="cuda"),
          "sh0": torch.rand(n, 1, 3, device="cuda"), "shN": torch.zeros(n, 15, 3, device="cuda")}
K = torch.tensor([[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]], device="cuda")
out = render_splats(splats, torch.eye(4, device="cuda"), K, 64, 64, sh_degree=0, backend="gsplat")
torch.cuda.synchronize()
print(f"gsplat ready in {time.perf_counter() - t:.1f} s; rgb mean {float(out.rgb.mean()):.4f}")
EOF

# --- 2. GPU tests (gsplat vs our rasterizer, CUDA decoder, NCCL trainer tests) --------------
step gpu_tests "$((STEP_TIMEOUT * 2))" "$PY" -m pytest -q -m "not slow" -k "gpu or cuda or nccl" \
    -p no:cacheprovider --junitxml="$WORK/gpu_tests.xml"

# --- 3. benchmarks on CUDA (each prints one JSON object) ------------------------------------
step bench_render "$STEP_TIMEOUT" bash -c "'$PY' scripts/benchmark_render.py --device cuda --repeats 10 --scales 0.5 1.0 \
    --skip_dense > '$WORK/bench_render.json'"
step bench_refine "$STEP_TIMEOUT" bash -c "'$PY' scripts/benchmark_refine.py --device cuda --scales 0.25 1.0 --iters 10 \
    --full > '$WORK/bench_refine.json'"
step bench_inference "$STEP_TIMEOUT" bash -c "'$PY' scripts/benchmark_inference.py --device cuda --repeats 10 \
    > '$WORK/bench_inference.json'"
step bench_animate "$STEP_TIMEOUT" bash -c "'$PY' scripts/benchmark_animate.py --frames 100 --render_frames 10 \
    > '$WORK/bench_animate.json'"

# --- 4. NCCL smoke: the decoder trainer under torchrun with the NCCL backend -----------------
# NCCL (>= 2.5) refuses two ranks on one GPU ("Duplicate GPU detected"), so with one GPU this runs
# NCCL with one rank (device-side reductions, set_device, sampler, barriers, rank-0 checkpoint)
# and two ranks on the same GPU with gloo (the same code path with world size 2); with >= 2 GPUs,
# two NCCL ranks on two devices.
SMOKE=$WORK/nccl_smoke
rm -rf "$SMOKE"; mkdir -p "$SMOKE"
step smoke_template 120 "$PY" scripts/build_template.py --data_root data/nersemble --subjects 306 369 \
    --image_scale 0.125 --output "$SMOKE/template.ply" --device cuda --iterations 20
smoke_run() {  # smoke_run NAME NPROC BACKEND
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$2" scripts/train_decoder.py \
      --data_root data/nersemble --subjects 306 369 --image_scale 0.25 --max_epochs 2 --max_steps 6 \
      --ply_file_path "$SMOKE/template.ply" --output_dir "$SMOKE/$1" --device cuda --dist_backend "$3" \
      --lpips_weight 0 --eval_every 1 --no-save_images --no-progress
}
export -f smoke_run; export PY SMOKE
if [ "$NGPU" -ge 2 ]; then
  step nccl_2gpu "$STEP_TIMEOUT" bash -c "smoke_run nccl2 2 nccl"
else
  step nccl_1rank "$STEP_TIMEOUT" bash -c "smoke_run nccl1 1 nccl"
  step gloo_2rank_1gpu "$STEP_TIMEOUT" bash -c "smoke_run gloo2 2 gloo"
fi

else
  echo "[gpu_check] no CUDA device usable from $PY: nothing else was run (see environment in the JSON)"
fi

# --- 5. one JSON ----------------------------------------------------------------------------
"$PY" - "$WORK" "$OUT" "$(( $(date +%s) - T0 ))" <<'EOF'
import json, re, sys
from pathlib import Path
work, out, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def load(name):
    path = work / name
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # a bench that printed notes before its JSON: take the last object
        start = text.rfind("\n{")
        try:
            return json.loads(text[start + 1:]) if start >= 0 else {"unparsed": text[-2000:]}
        except json.JSONDecodeError:
            return {"unparsed": text[-2000:]}

steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, secs, log = line.split("\t")
    tail = Path(log).read_text(errors="replace").strip().splitlines()[-3:] if Path(log).is_file() else []
    steps[name] = {"status": status, "seconds": int(secs), **({} if status == "ok" else {"log_tail": tail})}
tests = {}
xml = work / "gpu_tests.xml"
if xml.is_file():
    attrs = dict(re.findall(r'(tests|errors|failures|skipped)="(\d+)"', xml.read_text()))
    tests = {k: int(v) for k, v in attrs.items()}
smoke = {}
for run in ("nccl2", "nccl1", "gloo2"):
    hist = work / "nccl_smoke" / run / "history.json"
    ckpts = sorted(p.name for p in (work / "nccl_smoke" / run / "checkpoints").glob("*.pth")) \
        if (work / "nccl_smoke" / run / "checkpoints").is_dir() else []
    if hist.is_file() or ckpts:
        smoke[run] = {"history": json.loads(hist.read_text()) if hist.is_file() else None, "checkpoints": ckpts}
env = load("environment.json") or {}
report = {
    "gpu": env.get("gpu"), "environment": env, "total_seconds": total, "steps": steps, "gpu_tests": tests,
    "benchmarks": {k: load(f"bench_{k}.json") for k in ("render", "refine", "inference", "animate")},
    "distributed_smoke": smoke,
}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=2))
print(f"[gpu_check] wrote {out} ({report['gpu']}, {total} s); steps: "
      + ", ".join(f"{k}={v['status']}" for k, v in steps.items()))
sys.exit(0 if all(v["status"] == "ok" for v in steps.values()) else 1)
EOF
