"""Fault injection for the fault tests only (on PYTHONPATH of the worker they start).

SEG_FAULT_POISON_WIDTH: a job whose input has this width kills the worker process while its
mask is made, as a native crash in image code would. SEG_FAULT_SLOW_S: post-processing of each
job sleeps this long, so a test can kill a worker in the middle of a batch.
"""

import os

_poison = int(os.environ.get("SEG_FAULT_POISON_WIDTH", "0") or 0)
_slow = float(os.environ.get("SEG_FAULT_SLOW_S", "0") or 0)
if _poison or _slow:
    import time

    from segsvc.ml import preprocess

    _real = preprocess.resize_mask

    def resize_mask(mask, width, height):  # type: ignore[no-untyped-def]
        if _poison and width == _poison:
            os._exit(139)  # like a segfault: no cleanup, no ack, no result
        if _slow:
            time.sleep(_slow)
        return _real(mask, width, height)

    # The worker makes each job's full-size mask with this (imported by name after this runs).
    preprocess.resize_mask = resize_mask
