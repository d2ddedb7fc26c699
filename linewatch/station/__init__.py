"""Station work: fitting a station from good parts (training, calibration), measuring it (evaluation,
accuracy) and offline verdicts for files (infer). Depends on the model; never on the service."""
