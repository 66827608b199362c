#!/usr/bin/env bash
# The one prepared check of issue #15 for a session lent a GPU (an H200; about 6-8 minutes, 10 at most):
# the gpu-marked tests (UVA path vs CPU path vs host-gather path, bit for bit; the CUDA serving tests),
# then bench/bench_serving.py --device cuda with DRAM = 25% of the table bytes, UVA on (the default)
# and off (--compare-uva) side by side in one run. Prints the forward overhead, the share of fetch
# time hidden behind compute and bit-equality, and ends with ONE JSON line.
#
#   bench/gpu_check.sh --prepare       # HERE, once: wheels of what the GPU image lacks (lmdb, zstandard, zlib-ng) into .whl/
#   bench/gpu_check.sh                 # THERE (device run, carry [".whl"]): the check; files under $OUT
#   bench/gpu_check.sh --device cpu    # a dry run of the same steps on a CPU (small bench sizes)
#
# Goals (issue #15): forward overhead <= 3% at DRAM 25%, >= 95% of the fetch time hidden, rows bit-equal.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --prepare) PREPARE=1; shift ;;
    *) echo "usage: $0 [--prepare] [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
PY=python3
export PYTHONUNBUFFERED=1

if [ "$PREPARE" = 1 ]; then
  # The GPU image has python 3.12 and no lmdb / zstandard / zlib-ng; nothing can be fetched there.
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  for pkg in lmdb==3.0.0 zstandard==0.25.0 zlib-ng==1.1.0; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg"
  done
  ls -l .whl
  exit 0
fi

RES="${OUT:-/tmp/engram-gpu-check}"
mkdir -p "$RES"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }

# 1. dependencies: what the image lacks from carried wheels; the project editable over the torch already there
if ! $PY -c "import lmdb, zstandard, zlib_ng" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { log "lmdb/zstandard/zlib-ng missing and no .whl/: run '$0 --prepare' here first and carry .whl"; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$RES/install.log" 2>&1; then
  log "editable install failed (see install.log); importing from the checkout instead"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, engram_store; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$RES/env.txt"

# 2. the gpu-marked tests (on a CPU: the same tests with ENGRAM_GPU_TEST_DEVICE=cpu, no GPU-skipping conftest)
if [ "$DEVICE" = cuda ]; then
  TEST_ENV=(); TEST_ARGS=(tests/store/test_uva_gpu.py tests/model/test_serving_gpu.py)
  BENCH_ARGS=()
else
  TEST_ENV=(ENGRAM_GPU_TEST_DEVICE=cpu); TEST_ARGS=(--noconftest tests/store/test_uva_gpu.py)
  BENCH_ARGS=(--count-bytes 300000 --reps 1 --iters 1 --warmup 1 --gen-batch 2 --new-tokens 4
              --batch 2 --seq 64 --work /tmp/engram-gpu-check-dry)
fi
log "gpu tests on $DEVICE ..."
TESTS_RC=0
env "${TEST_ENV[@]}" timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider -rs "${TEST_ARGS[@]}" \
  --junitxml="$RES/gpu_tests.xml" 2>&1 | tee "$RES/gpu_tests.log" || TESTS_RC=$?

# 3. the serving benchmark, UVA on and off side by side, DRAM 25%
log "bench_serving on $DEVICE (DRAM 25%, UVA on and off) ..."
BENCH_RC=0
timeout 420 $PY bench/bench_serving.py --device "$DEVICE" --dram 0.25 --compare-uva --no-profile "${BENCH_ARGS[@]}" \
  >"$RES/bench_serving.out" 2>"$RES/bench_serving.err" || BENCH_RC=$?
tail -n 40 "$RES/bench_serving.err" >&2 || true
grep -v '^{' "$RES/bench_serving.out" || true

# 4. the figures and one JSON line
TESTS_RC=$TESTS_RC BENCH_RC=$BENCH_RC DEVICE=$DEVICE RES=$RES $PY - <<'EOF'
import json, os, xml.etree.ElementTree as ET

res = os.environ["RES"]
out = {"check": "issue15_uva", "device": os.environ["DEVICE"], "tests_rc": int(os.environ["TESTS_RC"]),
       "bench_rc": int(os.environ["BENCH_RC"])}
try:
    suite = ET.parse(os.path.join(res, "gpu_tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    out["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError) as e:
    out["tests"] = {"error": repr(e)}
lines = [l for l in open(os.path.join(res, "bench_serving.out")).read().splitlines() if l.startswith("{")]
if lines:
    b = json.loads(lines[-1])
    v = b["variants"]
    on = next(n for n in v if n.startswith("store dram25") and n.endswith("dram25"))
    off = on + " uva-off"
    pick = lambda n: {"forward_overhead_pct": v[n].get("forward_overhead_pct"),
                      "hidden_fraction_forward": v[n].get("hidden_fraction_forward"),
                      "generate_overhead_pct": v[n].get("generate_overhead_pct"),
                      "forward_tok_s": v[n].get("forward_tok_s"), "bit_exact": b["bit_exact"].get(n),
                      "dram_gather": b.get("dram_gather", {}).get(n)}
    out["uva_on"], out["uva_off"] = pick(on), pick(off)
    out["device_name"], out["table_mib"], out["bench_seconds"] = b["device_name"], b["table_mib"], b["seconds"]
    u = out["uva_on"]
    out["goals"] = {"uva_active": bool(u["dram_gather"]) and all(m == "uva" for m in u["dram_gather"].values()),
                    "forward_overhead_le_3pct": u["forward_overhead_pct"] is not None and u["forward_overhead_pct"] <= 3.0,
                    "fetch_hidden_ge_95pct": u["hidden_fraction_forward"] is not None and u["hidden_fraction_forward"] >= 0.95,
                    "bit_exact": bool(u["bit_exact"]) and bool(out["uva_off"]["bit_exact"]),
                    "tests_pass": out["tests_rc"] == 0}
    print("\n| variant | forward overhead | fetch hidden | generate overhead | bit-exact | DRAM gather |")
    print("|---|---:|---:|---:|---|---|")
    for name, r in (("UVA on", out["uva_on"]), ("UVA off (host gather)", out["uva_off"])):
        print(f"| {name} | {r['forward_overhead_pct']:+.2f}% | {100 * r['hidden_fraction_forward']:.1f}% | "
              f"{r['generate_overhead_pct']:+.2f}% | {r['bit_exact']} | {r['dram_gather']} |")
else:
    out["bench"] = "no JSON line (see bench_serving.err)"
print(json.dumps(out))
EOF
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
