"""The streaming pipeline behind ``linewatch run``.

capture (one thread per camera) → FrameQueue (bounded per camera, newest frame wins)
→ InferenceWorker (micro-batches across cameras) → Publisher (bounded queue, ZeroMQ PUB thread).

Submodules are imported where needed: importing this package must not pull in torch.
"""
