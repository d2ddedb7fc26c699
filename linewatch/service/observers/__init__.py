"""Observers of the verdict stream inside the daemon, each on its own thread: drift and camera
health (drift), the reject archive (archive). The worker only appends to their bounded queues."""
