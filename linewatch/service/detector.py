"""What the service needs of a model: the :class:`Detector` protocol.

The worker, the daemon and the model reloader are typed against this, not against
:class:`linewatch.model.Detector`, which satisfies it; so do the tests' fake detectors and `linewatch
bench`'s wrappers. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from linewatch.model import Calibration, Prediction


class DetectorMeta(Protocol):
    """The part of a bundle's metadata the service reports (log ``model_loaded``, ``linewatch_model_info``)."""

    @property
    def backbone(self) -> str: ...


@runtime_checkable
class Detector(Protocol):
    """A loaded, calibrated model that scores batches of frames."""

    @property
    def model_id(self) -> str: ...  # stamped on every verdict

    @property
    def meta(self) -> DetectorMeta: ...

    @property
    def input_size(self) -> tuple[int, int]: ...  # (h, w) the cameras resize frames to

    @property
    def device(self) -> torch.device: ...

    @property
    def engine(self) -> str: ...  # the inference engine that runs (reported at start)

    @property
    def calibration(self) -> Calibration: ...  # raises a LinewatchError when the bundle has none

    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a uint8 (B,H,W,3) batch at ``input_size``: maps (B,H,W) and scores (B,), on the CPU."""
        ...

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Prepare inference (build, trace, compile) before the first frame, so frame 1 pays nothing extra."""
        ...
