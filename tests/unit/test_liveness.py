"""Daemon liveness (the watchdog gate): every stage alive and, where frames wait, making progress."""

from types import SimpleNamespace

from linewatch.service.liveness import check_liveness

NOW = 1000.0
STALL = 30.0


def worker(**kw):
    return SimpleNamespace(**{"healthy": True, "busy_since": None, "last_tick": NOW - 1, **kw})


def publisher(**kw):
    return SimpleNamespace(**{"healthy": True, "last_tick": NOW - 1, **kw})


class Camera:
    def __init__(self, camera: str, state: str = "up", alive: bool = True):
        self.camera, self.state, self._alive = camera, state, alive

    def is_alive(self) -> bool:
        return self._alive


def check(w=None, p=None, cams=()):
    return check_liveness(w, p, cams, STALL, now=NOW)


def test_all_running_is_live():
    assert check(worker(), publisher(), [Camera("a"), Camera("b", state="ended", alive=False)]) == (True, "ok")


def test_an_idle_worker_with_no_frames_is_live():
    # busy_since None and a recent tick: waiting for frames is not a stall
    assert check(worker(last_tick=NOW - STALL + 1), publisher(), [])[0]


def test_each_failure_names_its_stage():
    assert check(None, publisher()) == (False, "inference worker dead or failing")
    assert check(worker(healthy=False), publisher()) == (False, "inference worker dead or failing")
    assert check(worker(busy_since=NOW - 45), publisher()) == (False, "a batch has been in the model for 45 s")
    assert check(worker(last_tick=NOW - STALL - 1), publisher()) == (False, "inference worker stalled")
    assert check(worker(), None) == (False, "publisher stalled")
    assert check(worker(), publisher(healthy=False)) == (False, "publisher stalled")
    assert check(worker(), publisher(last_tick=NOW - STALL - 1)) == (False, "publisher stalled")
    assert check(worker(), publisher(), [Camera("a"), Camera("b", alive=False)]) == (
        False, "capture thread of b died")
