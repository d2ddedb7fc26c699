# Two front-door commands: `make demo` (main job on real data) and `make test`.
# Both create/reuse .venv and install what they need; weights land in .cache/torch.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TORCH_HOME ?= $(CURDIR)/.cache/torch
SHARED ?= $(abspath $(CURDIR)/../shared)
BOTTLE ?= $(SHARED)/data/mvtec_ad/bottle
STAMP := $(VENV)/.installed

.PHONY: venv weights sysdeps test test-fast lint demo demo-bottle clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds this workplace serves from local disk
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

weights: $(STAMP)
	$(BIN)/linewatch weights fetch

lint: $(STAMP)
	$(BIN)/ruff check linewatch tests scripts

# Debian packages the tests use: a real Prometheus (dashboard/alert test), systemd-analyze, Chromium with
# its WebDriver (the `linewatch view` browser test) and a real MQTT broker, mosquitto (the bridge tests).
# Installed only where missing and only as root (CI); elsewhere those tests skip and say why.
sysdeps:
	@if test -x /usr/bin/prometheus && command -v systemd-analyze >/dev/null && test -x /usr/bin/chromium \
		&& test -x /usr/bin/chromedriver && test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus systemd chromium chromium-driver mosquitto; \
	else echo "note: prometheus/systemd-analyze/chromium/mosquitto missing and not root: their tests will be skipped"; fi
	@# Cameras (docs/cameras.md): Aravis and its fake GigE Vision camera, GStreamer's RTSP server with x264 (run by
	@# Debian's python3-gi), and PyGObject built into the venv against Debian's introspection (3.51+ needs
	@# libgirepository-2.0, which Debian 12 lacks); pypylon brings pylon's camera emulation.
	@if test -x /usr/bin/arv-fake-gv-camera-0.8 && ls /usr/lib/*/girepository-1.0/GstRtspServer-1.0.typelib >/dev/null 2>&1 \
		&& ls /usr/lib/*/gstreamer-1.0/libgstx264.so >/dev/null 2>&1 && pkg-config --exists gobject-introspection-1.0 cairo; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gir1.2-aravis-0.8 \
			aravis-tools python3-gi gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 \
			gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-libav \
			libgirepository1.0-dev libcairo2-dev pkg-config gcc; \
	else echo "note: Aravis/GStreamer RTSP packages missing and not root: the aravis:// and rtsp:// tests will be skipped"; fi
	@test ! -x $(BIN)/python || $(BIN)/python -c 'import gi' 2>/dev/null || $(BIN)/pip install -q 'PyGObject>=3.42,<3.51' \
		|| echo "note: PyGObject did not build in the venv: the aravis:// tests will be skipped"
	@test ! -x $(BIN)/python || $(BIN)/python -c 'import pypylon' 2>/dev/null || $(BIN)/pip install -q -e '.[pylon]' \
		|| echo "note: pypylon not installed: the pylon:// emulator tests will be skipped"

# Everything (what CI runs): unit, integration (real daemon processes, sockets, HTTP) and deploy checks.
test: weights sysdeps
	$(BIN)/ruff check linewatch tests scripts
	$(BIN)/pytest -q

# The fast loop while editing: unit tests only (no daemon process, no Debian packages), without the ones marked
# slow (fuzzing, a trained-model measurement), under a minute. `make test` runs those too.
test-fast: weights
	$(BIN)/ruff check linewatch tests scripts
	$(BIN)/pytest -q -m "not slow" tests/unit

# The main job end to end on real data: calibrate a station on good ELPV solar cells (fetched from
# PyPI), stream held-out good and defective cells through the real daemon, print verdicts and a summary.
demo: weights
	$(BIN)/python -m linewatch.tools.demo --out demo-out/elpv

# MVTec AD bottle from ../shared: calibrate → evaluate (AUROC, PRO) → infer overlays.

demo-bottle: weights
	@test -d $(BOTTLE)/train/good || { echo "MVTec bottle not found at $(BOTTLE) (set BOTTLE=...)"; exit 2; }
	mkdir -p demo-out
	test -f demo-out/bottle.lwm || $(BIN)/linewatch calibrate --normal-dir $(BOTTLE)/train/good --out demo-out/bottle.lwm
	$(BIN)/linewatch evaluate --model demo-out/bottle.lwm --mvtec $(BOTTLE) --json demo-out/bottle-eval.json
	$(BIN)/linewatch infer --model demo-out/bottle.lwm --out demo-out/infer \
		$(BOTTLE)/test/good/000.png $(BOTTLE)/test/broken_large/000.png \
		$(BOTTLE)/test/broken_small/000.png $(BOTTLE)/test/contamination/000.png

clean:
	rm -rf demo-out .pytest_cache
