"""`linewatch bench` in short mode: it runs and reports every field. Never a speed threshold here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from linewatch.tools.harness import ROOT, subprocess_env, write_images

MODE_FIELDS = {"mode", "images_per_s", "rounds", "batch", "notes", "latency_ms", "profile_ms", "cpu_ms", "dropped",
               "fail_fraction", "rss_mb_at_60s", "rss_mb_end", "rss_samples", "cpu_ms_per_image", "capture",
               "captured_per_s", "verdicts"}
STAGES = {"read", "prepare", "queue_wait", "preprocess", "forward", "postprocess", "publish"}


@pytest.mark.slow
def test_bench_short_runs_and_its_json_has_every_field(tmp_path, bottle):
    images = tmp_path / "images"
    write_images(images / "good", 4, size=(96, 128), seed=1)  # the untrained model's thresholds come from good/
    write_images(images / "defect", 4, size=(96, 128), seed=2)
    out = tmp_path / "bench.json"
    # a bundle whose image score has levels of its own, timed beside the default model
    from linewatch.tools.fixtures import make_untrained_bundle

    other = make_untrained_bundle(tmp_path / "score-2-3-4.lwm", bottle, stages=(2, 3), score_stages=(2, 3, 4))
    # a subprocess: the bench sets process-wide torch/OpenCV thread counts
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--short", "--input-size", "64", "--images", str(images),
         "--json", str(out), "--profile", "--quiet", "--compare-engines", "reference", "--compare-models", str(other)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "linewatch-raw / bare" in proc.stdout and "where a frame's time goes" in proc.stdout

    res = json.loads(out.read_text())
    for key in ("model", "device", "threads", "cameras", "batch", "batch_sweep", "images", "rounds", "duration_s",
                "modes", "ratios", "latency", "rss_mb", "targets", "load_average"):
        assert key in res, key
    assert set(res["modes"]) == {"bare", "naive", "linewatch-raw", "linewatch-files", "linewatch-raw-paced",
                                 "bare[reference]", "bare[score-2-3-4.lwm]"}
    for name, mode in res["modes"].items():
        assert MODE_FIELDS <= set(mode), (name, MODE_FIELDS - set(mode))
        assert mode["images_per_s"] > 0, name  # it produced results (not a speed requirement)
    for name in ("linewatch-raw", "linewatch-files", "linewatch-raw-paced"):
        mode = res["modes"][name]
        assert set(mode["latency_ms"]) == {"p50", "p95", "p99", "n"} and mode["latency_ms"]["n"] > 0
        assert set(mode["profile_ms"]) == STAGES
        assert mode["cpu_ms"]["inference"] > 0 and mode["rss_mb_end"] > 0
    assert set(res["ratios"]) == {"raw_over_bare", "files_over_naive", "cpu_raw_over_bare", "cpu_files_over_naive",
                                  "jpeg_over_bare", "graph_over_eager"}
    assert all(isinstance(res["ratios"][k], float) for k in ("raw_over_bare", "files_over_naive", "cpu_raw_over_bare",
                                                             "cpu_files_over_naive"))
    assert res["ratios"]["jpeg_over_bare"] is None and res["ratios"]["graph_over_eager"] is None  # not run here
    assert res["device"]["type"] == "cpu"
    assert set(res["latency"]) == {"bare_batch_ms", "raw_p50_ms", "raw_p95_ms", "raw_p99_ms", "p99_over_bare_batch",
                                   "paced_load", "paced_p50_ms", "paced_p95_ms", "paced_p99_ms",
                                   "paced_p99_over_bare_batch"}
    assert set(res["rss_mb"]) == {"before_streaming", "peak", "end", "end_anon", "end_file"}
    assert res["model"]["input_size"] == [64, 64] and res["model"]["engine"] in ("jit", "eager")
    assert res["threads"]["torch"] >= 1 and res["images"]["files"] == 8
    # the default capture is the daemon's: files in capture processes; raw frames (no decode) in threads
    assert res["capture"] == "process"
    assert res["modes"]["linewatch-files"]["capture"] == "process"
    assert res["modes"]["linewatch-raw"]["capture"] == res["modes"]["linewatch-raw-paced"]["capture"] == "thread"
    assert res["modes"]["bare"]["capture"] is None


def _bench_files(tmp_path, capture: str) -> dict:
    images = tmp_path / "images"
    write_images(images / "good", 4, size=(96, 128), seed=1)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--short", "--input-size", "64", "--images", str(images),
         "--json", str(out), "--quiet", "--profile", "--modes", "linewatch-files", "--capture", capture],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"json": json.loads(out.read_text()), "stdout": proc.stdout}


@pytest.mark.slow
def test_bench_files_in_capture_processes_as_the_daemon(tmp_path):
    run = _bench_files(tmp_path, "process")
    res = run["json"]
    assert res["capture"] == "process" and set(res["modes"]) == {"linewatch-files"}
    files = res["modes"]["linewatch-files"]
    assert MODE_FIELDS <= set(files)
    assert files["capture"] == "process" and files["verdicts"] > 0 and files["latency_ms"]["n"] > 0
    # decoding happened in the capture processes: their CPU is measured, and no frame came from a bench camera
    assert files["cpu_ms"]["capture processes"] > 0 and "capture" not in files["cpu_ms"]
    # free-running cameras: they delivered at least what was inspected; what the daemon could not take is dropped
    assert files["captured_per_s"] >= files["images_per_s"] > 0
    assert "free-running" in files["notes"] and "capture processes" in files["notes"]
    assert "capture: --capture process" in run["stdout"] and "linewatch-files (capture process)" in run["stdout"]


@pytest.mark.slow
def test_bench_files_in_capture_threads_on_request(tmp_path):
    res = _bench_files(tmp_path, "thread")["json"]
    files = res["modes"]["linewatch-files"]
    assert res["capture"] == files["capture"] == "thread" and files["verdicts"] > 0
    assert "capture processes" not in files["cpu_ms"] and "capture" in files["cpu_ms"]  # the capture thread
    assert "triggered when there is room" in files["notes"]


def test_bench_refuses_a_missing_images_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--short", "--images", str(tmp_path / "nope")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_jpeg_mode_runs_on_the_cpu_with_two_cameras(tmp_path):
    images = tmp_path / "images"
    write_images(images / "good", 4, size=(96, 128), seed=1)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--short", "--input-size", "64", "--images", str(images),
         "--json", str(out), "--quiet", "--modes", "bare,linewatch-jpeg", "--cameras", "2", "--latency-load", "0"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "linewatch-jpeg / bare" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"bare", "linewatch-jpeg"} and res["cameras"] == 2
    jpeg = res["modes"]["linewatch-jpeg"]
    assert MODE_FIELDS <= set(jpeg) and jpeg["images_per_s"] > 0
    assert set(jpeg["latency_ms"]) == {"p50", "p95", "p99", "n"} and jpeg["latency_ms"]["n"] > 0
    assert set(jpeg["profile_ms"]) >= {"read", "forward", "publish"} and jpeg["cpu_ms"]["inference"] > 0
    assert isinstance(res["ratios"]["jpeg_over_bare"], float)


def test_bench_refuses_an_unknown_mode_and_cuda_without_a_gpu_in_one_line(tmp_path):
    import torch

    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--short", "--modes", "bare,warp"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "linewatch-jpeg" in proc.stderr and "Traceback" not in proc.stderr
    if torch.cuda.is_available():
        return
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--short", "--device", "cuda"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "no CUDA GPU is visible" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
