"""TensorBoard event files without TensorFlow, and a progress bar with ETA.

`SummaryWriter` writes scalars (loss, MAE, learning rate, volumes/s) and PNG images (mid-slices of
input volumes) through tensorboard's own `EventFileWriter`; `tensorboard --logdir W/tensorboard`
shows them. Only process 0 writes: on other processes the writer is a no-op, so the training loop
calls it unconditionally.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jax_brainage.sharding import is_main_process


def encode_png(image: np.ndarray) -> bytes:
  """Greyscale PNG of a `[height, width]` uint8 image (no external image library needed)."""
  image = np.ascontiguousarray(image, dtype=np.uint8)
  height, width = image.shape
  # Filter type 0 (None) before every row.
  raw = np.concatenate([np.zeros((height, 1), np.uint8), image], axis=1).tobytes()

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
          + chunk(b"IEND", b""))


def mid_slices(volume: np.ndarray,
               window: tuple[float, float] | None = (0.0, 1.0)) -> np.ndarray:
  """Sagittal, coronal and axial mid-slices of each channel, side by side, as one image.

  Args:
    volume: `[x, y, z, channel]`, RAS+ (uint8, or float network inputs).
    window: float intensities mapped linearly from [low, high] onto black..white (clipped), e.g.
      (0, 1) for uint8 caches' inputs; None: each channel's own min..max in the volume (z-scores).
      uint8 volumes are shown as they are.
  Returns:
    uint8 `[rows, columns]`: one row of three panels (sagittal | coronal | axial) per channel,
    each panel shown radiologically upright (superior / anterior at the top).
  """
  v = np.asarray(volume)
  if v.dtype != np.uint8:
    v = np.asarray(v, np.float32)
    if window is None:
      low, high = v.min(axis=(0, 1, 2)), v.max(axis=(0, 1, 2))
    else:
      low, high = np.float32(window[0]), np.float32(window[1])
    span = np.maximum(high - low, np.finfo(np.float32).tiny)
    v = np.clip(np.rint((v - low) / span * 255.0), 0, 255).astype(np.uint8)
  x, y, z, channels = v.shape
  side = max(x, y, z)

  def pad(panel: np.ndarray) -> np.ndarray:
    out = np.zeros((side, side), np.uint8)
    out[:panel.shape[0], :panel.shape[1]] = panel
    return out

  rows = []
  for c in range(channels):
    sagittal = v[x // 2, :, :, c].T[::-1]   # rows: z (superior up), columns: y
    coronal = v[:, y // 2, :, c].T[::-1]    # rows: z, columns: x
    axial = v[:, :, z // 2, c].T[::-1]      # rows: y (anterior up), columns: x
    rows.append(np.concatenate([pad(sagittal), pad(coronal), pad(axial)], axis=1))
  return np.concatenate(rows, axis=0)


class SummaryWriter:
  """TensorBoard writer for one run; writes only on process 0 (`enabled`)."""

  def __init__(self, logdir: str | Path, enabled: bool | None = None):
    self.enabled = is_main_process() if enabled is None else enabled
    self._writer = None
    if self.enabled:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      Path(logdir).mkdir(parents=True, exist_ok=True)
      self._writer = EventFileWriter(str(logdir))

  def _write(self, step: int, values: list[Any]) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._writer.add_event(event)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """One point per tag, e.g. {'train/loss': 12.3, 'train/learning_rate': 5e-4}."""
    if not self.enabled:
      return
    from tensorboard.compat.proto import summary_pb2
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                       for k, v in values.items()])

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """A greyscale uint8 image `[height, width]`."""
    image = np.asarray(image, np.uint8)
    self.encoded_image(step, tag, encode_png(image), image.shape[0], image.shape[1], 1)

  def encoded_image(self, step: int, tag: str, png: bytes, height: int, width: int,
                    channels: int) -> None:
    """An already encoded PNG of `height` x `width` pixels with 1 (grey), 3 (RGB) or 4 (RGBA)
    channels, e.g. a colour relevance montage."""
    if not self.enabled:
      return
    from tensorboard.compat.proto import summary_pb2
    value = summary_pb2.Summary.Image(height=int(height), width=int(width),
                                      colorspace=int(channels), encoded_image_string=png)
    self._write(step, [summary_pb2.Summary.Value(tag=tag, image=value)])

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def progress_bar(total: int, initial: int = 0, quiet: bool = False, desc: str = "train"):
  """tqdm bar with ETA over `total` steps; silent when `quiet` or not process 0."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=quiet or not is_main_process(), leave=True)
