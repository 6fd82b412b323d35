"""TensorBoard event files for `--logdir` (train: loss, grad norm, images/s, learning rate
per logged step; evaluate: the metrics), written with tensorboardX (the optional
`tensorboard` extra; no TensorFlow), and read back without TensorBoard."""
from __future__ import annotations

import math
import os
import struct

from fmjax.errors import ConfigError

__all__ = ["EventLog", "read_scalars"]


class EventLog:
    """Scalars into TensorBoard event files under `logdir` (one file per writer).
    ConfigError (one line) when tensorboardX is not installed."""

    def __init__(self, logdir: str):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--logdir writes TensorBoard event files with tensorboardX: "
                              "pip install 'fmjax[tensorboard]' (or tensorboardX)") from None
        os.makedirs(logdir, exist_ok=True)
        self._writer = SummaryWriter(logdir=logdir, flush_secs=5)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        """Every finite number in `values` as scalar `prefix/key` at `step`."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{key}", float(value), int(step))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of every event file under `logdir` (in file order),
    read from the TFRecord framing with tensorboardX's Event message."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in sorted(os.walk(logdir)):
        for name in sorted(f for f in files if "tfevents" in f):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            offset = 0
            while offset + 12 <= len(data):
                (length,) = struct.unpack("<Q", data[offset:offset + 8])
                record = data[offset + 12:offset + 12 + length]
                offset += 12 + length + 4  # length, its CRC, the record, its CRC
                event = Event.FromString(record)
                for value in event.summary.value:
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars
