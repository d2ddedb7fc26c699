"""Tools around the daemon: the process harness, bench, soak, demo and small test fixtures."""
