"""What the daemon tells its operators: Prometheus metrics (prometheus) and systemd (sdnotify)."""
