"""Fitting the student(s) on good images."""

from linewatch.training.train import TrainConfig, TrainResult, split_indices, train_students

__all__ = ["TrainConfig", "TrainResult", "split_indices", "train_students"]
