#!/usr/bin/env bash
# The one prepared GPU check for issue 10: every figure of docs/performance.md's "H200" table, as JSON under $OUT.
#
# On the lent device machine, from the project root (after ../shared/gpu/prepare.sh built .device/ here, and
# with the device tool's carry [".device"]):
#     source .device/env.sh; bash scripts/gpu-bench.sh            # ~4 minutes; at most 8 (step timeouts)
# Elsewhere with a GPU and the venv:  OUT=/tmp/gpu BOTTLE=../shared/data/mvtec_ad/bottle bash scripts/gpu-bench.sh
#
# Writes $OUT/first-verdict.json (start-up time), $OUT/checks.json (graph engine vs eager, the device resize and JPEG decode against the CPU paths, eager
# and graph under GIL contention), $OUT/bench-<backbone>.json (+ .txt: the report) and $OUT/log.txt. A step that
# fails or times out is recorded and the others still run.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
BOTTLE=${BOTTLE:-../shared/data/mvtec_ad/bottle}
CAMERAS=${CAMERAS:-8}
DURATION=${DURATION:-5}
mkdir -p "$OUT"
LINEWATCH=${LINEWATCH:-linewatch}
command -v "$LINEWATCH" >/dev/null || LINEWATCH="python3 -m linewatch.cli"
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "gpu-bench: $(date -u +%FT%TZ) bottle=$BOTTLE cameras=$CAMERAS duration=${DURATION}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. checks that need the GPU: engine, preprocessing, decode, GIL contention
timeout 180 python3 - "$OUT/checks.json" "$BOTTLE" <<'PY' || echo "checks: FAILED or timed out (rc $?)"
import json, sys, threading, time
from pathlib import Path

import cv2
import numpy as np
import torch

from linewatch.imaging.images import read_image
from linewatch.model import BundleMeta, Detector
from linewatch.model.preprocess import resize_frames_cpu, resize_frames_device
from linewatch.model.stfpm import STFPM, default_blur_sigma
from linewatch.model.weights import load_teacher

import os

out, bottle = Path(sys.argv[1]), Path(sys.argv[2])
DEV = torch.device(os.environ.get("CHECK_DEVICE", "cuda"))  # CHECK_DEVICE=cpu CHECK_SIZE=64: a smoke run of this script
SIZE = int(os.environ.get("CHECK_SIZE", "256"))
cuda = DEV.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "size": SIZE}
paths = sorted((bottle / "test").glob("*/*.png"))[:32]
frames = [read_image(p) for p in paths]

def detector(engine, backbone="mobilenet_v2", size=SIZE):
    torch.manual_seed(0)
    try:
        teacher, digest = load_teacher(backbone)
    except Exception:
        teacher, digest = None, "random-init"
    model = STFPM(backbone, teacher=teacher, input_size=(size, size), blur_sigma=default_blur_sigma((size, size)))
    meta = BundleMeta(backbone, digest, (size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1,
                      default_blur_sigma((size, size)))
    return Detector(model, meta, "gpu-check", DEV, engine=engine)

# graph engine: built, checked against eager, same scores as eager on real frames
t0 = time.perf_counter()
g = detector("auto")
g.warm_up((1, 64))
res["graph_engine"] = {"engine_after_build": g.engine, "build_s": round(time.perf_counter() - t0, 2),
                       "buckets": list(getattr(g._fast, "buckets", []))}
e = detector("eager")
e.warm_up((1, 64))
x = torch.from_numpy(resize_frames_cpu(frames[:13], (SIZE, SIZE)))  # 13: padded into the bucket of 16
pg, pe = g.predict(x), e.predict(x)
res["graph_engine"]["max_rel_score_diff_vs_eager"] = float((pg.scores - pe.scores).abs().max() / pe.scores.abs().max())
res["graph_engine"]["max_rel_map_diff_vs_eager"] = float((pg.maps - pe.maps).abs().max() / pe.maps.abs().max())

# device resize vs the CPU (calibration) resize: the same (untrained) model; differences relative to a
# threshold at the median score, verdicts compared at that threshold (the hardest place for them to agree)
s_cpu = e.predict(torch.from_numpy(resize_frames_cpu(frames, (SIZE, SIZE)))).scores
thr = float(s_cpu.median())
s_dev = torch.cat([e.predict_frames(frames[i:i + 16]).scores for i in range(0, len(frames), 16)])
res["device_resize"] = {"device_preprocess": e.device_preprocess, "images": len(frames),
                        "max_abs_score_diff_over_threshold": float((s_dev - s_cpu).abs().max() / thr),
                        "verdicts_equal": bool(torch.equal(s_dev > thr, s_cpu > thr))}

# nvJPEG: round trip against cv2, a corrupt blob in the batch, throughput of decode + device resize
blobs = [cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
         for f in frames]
dec = e.decode_jpegs(blobs[:4] + [b"corrupt"] + blobs[4:8])
ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(blobs[0], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
res["jpeg"] = {"kinds": [type(d).__name__ for d in dec], "device": str(dec[0].device),
               "max_abs_pixel_diff_vs_cv2": int(np.abs(dec[0].cpu().numpy().astype(int) - ref.astype(int)).max())}
batch = (blobs * 4)[:64]
for _ in range(2):
    e.predict_frames(e.decode_jpegs(batch))
sync()
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 3:
    imgs = e.decode_jpegs(batch)
    resize_frames_device(imgs, (SIZE, SIZE)); n += len(batch)
sync()
res["jpeg"]["decode_resize_images_per_s_batch64"] = round(n / (time.perf_counter() - t0), 1)
t0 = time.perf_counter(); n = 0
while time.perf_counter() - t0 < 3:
    e.predict_frames(e.decode_jpegs(batch)); n += len(batch)
res["jpeg"]["decode_resize_predict_images_per_s_batch64"] = round(n / (time.perf_counter() - t0), 1)

# eager vs graph at batch 16, alone and with 4 Python threads running small numpy loops (the GIL convoy)
xb = torch.from_numpy(resize_frames_cpu((frames * 2)[:16], (SIZE, SIZE)))
xb = xb.pin_memory() if cuda else xb
def rate(det, seconds=3.0):
    det.predict(xb); n = 0; t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        det.predict(xb); n += 16
    return round(n / (time.perf_counter() - t0), 1)
stop = threading.Event()
def busy():
    a = np.random.rand(64)
    while not stop.is_set():
        for _ in range(100):
            a = np.sqrt(a * a + 1.0) - 0.5
res["gil"] = {"eager_alone": rate(e), "graph_alone": rate(g)}
threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
for t in threads: t.start()
res["gil"].update(eager_4_busy_threads=rate(e), graph_4_busy_threads=rate(g))
stop.set()
for t in threads: t.join()
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
PY

# 2. the bench, per backbone: bare eager + bare graph (sweep to 256), raw / files / jpeg with $CAMERAS cameras;
#    files and jpeg in capture processes as the daemon runs them (free-running; drops reported), raw in threads
for backbone in mobilenet_v2 resnet18; do
  timeout 150 $LINEWATCH bench --device cuda --backbone "$backbone" --cameras "$CAMERAS" --capture process \
    --modes bare,linewatch-raw,linewatch-files,linewatch-jpeg --duration "$DURATION" --rounds 1 --warmup 2 \
    --sweep-s 0.5 --images "$BOTTLE/test" --profile --quiet --json "$OUT/bench-$backbone.json" \
    > "$OUT/bench-$backbone.txt" || echo "bench $backbone: FAILED or timed out (rc $?)"
  cat "$OUT/bench-$backbone.txt"
done
# 3. start-up: `linewatch run` → first verdict with $CAMERAS looping dir:// cameras (target ≤ 5 s), on a bundle
#    calibrated here in a few epochs (its accuracy does not matter, its size and engine do)
GOOD="$BOTTLE/train/good"; test -d "$GOOD" || GOOD="$BOTTLE/test/good"
timeout 120 $LINEWATCH calibrate --normal-dir "$GOOD" --out "$OUT/startup.lwm" --epochs 2 --device cuda --no-report \
  > "$OUT/startup-calibrate.txt" 2>&1 || echo "startup calibrate: FAILED or timed out (rc $?)"
timeout 150 python3 scripts/first_verdict.py --model "$OUT/startup.lwm" --images "$BOTTLE/test" --cameras "$CAMERAS" \
  --device cuda --runs 3 > "$OUT/first-verdict.json" || echo "first verdict: FAILED or timed out (rc $?)"
cat "$OUT/first-verdict.json"
echo "gpu-bench: done $(date -u +%FT%TZ)"
