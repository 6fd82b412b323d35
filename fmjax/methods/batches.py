"""The batching every scorer shares: images spread over a data mesh, a fixed number of
images per device and call (the last batch padded), so one compiled program serves any
number of images."""
from __future__ import annotations

import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from fmjax import xla_options
from fmjax.distributed.mesh import DATA_AXIS, data_mesh, replicated
from fmjax.errors import DataError

__all__ = ["ImageBatches", "check_images", "scoring_progress"]

_PROGRESS = contextvars.ContextVar("fmjax_scoring_progress", default="")


@contextlib.contextmanager
def scoring_progress(desc: str = "scoring", enabled: bool = True):
    """Inside the block every scoring call of more than one batch shows a progress bar
    with its ETA on stderr (tqdm, labelled `desc`), advanced per batch of images."""
    token = _PROGRESS.set(desc if enabled else "")
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def check_images(images, class_ids, image_shape):
    """-> (uint8-compatible images [N,H,W,C], int32 class ids [N] (zeros when None)); a
    one-line DataError for any other shape."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != tuple(image_shape):
        raise DataError(f"images must be [N, {', '.join(map(str, image_shape))}], got {list(images.shape)}")
    class_ids = np.zeros(len(images), np.int32) if class_ids is None else np.asarray(class_ids, np.int32)
    if class_ids.shape != (len(images),):
        raise DataError(f"class ids must be [{len(images)}], got {list(class_ids.shape)}")
    return images, class_ids


class ImageBatches:
    """Runs local_fn(params, images_u8 [b,H,W,C], class_ids [b], *consts) -> tuple of
    per-image arrays on every device's share of each batch, and reassembles them in image
    order. `image_batch` images per device per call; `consts` (noise, times, ...) are
    replicated."""

    def __init__(self, local_fn, image_shape, image_batch: int, num_consts: int, num_outputs: int, devices=None):
        self.image_shape = tuple(image_shape)
        self.mesh = data_mesh(devices)
        self.replicated = replicated(self.mesh)
        self.batch = image_batch * self.mesh.devices.size
        self.num_outputs = num_outputs
        data = P(DATA_AXIS)
        self.fn = xla_options.jit(jax.shard_map(local_fn, mesh=self.mesh,
                                                in_specs=(P(), data, data) + (P(),) * num_consts,
                                                out_specs=(data,) * num_outputs, check_vma=False))

    def _progress(self, num_images: int):
        """A tqdm bar for `num_images` inside `scoring_progress` (None outside, or for one batch)."""
        desc = _PROGRESS.get()
        if not desc or num_images <= self.batch:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=num_images, desc=desc, unit="img", dynamic_ncols=True, leave=False)

    def __call__(self, params, images, class_ids, *consts) -> tuple:
        """images uint8 [N,H,W,C], class_ids int [N] or None -> tuple of numpy arrays [N, ...]."""
        images, class_ids = check_images(images, class_ids, self.image_shape)
        params = jax.device_put(params, self.replicated)  # a no-op when already replicated
        parts = [[] for _ in range(self.num_outputs)]
        bar = self._progress(len(images))
        try:
            for start in range(0, len(images), self.batch):
                chunk = images[start:start + self.batch]
                pad = self.batch - len(chunk)
                outs = self.fn(params, np.pad(chunk, ((0, pad),) + ((0, 0),) * 3),
                               np.pad(class_ids[start:start + self.batch], (0, pad)), *consts)
                for store, out in zip(parts, outs):
                    store.append(np.asarray(out)[:len(chunk)])
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if not parts[0]:
            shapes = [jax.eval_shape(self.fn, params, np.zeros((self.batch,) + self.image_shape, np.uint8),
                                     np.zeros(self.batch, np.int32), *consts)[i].shape[1:]
                      for i in range(self.num_outputs)]
            return tuple(np.zeros((0,) + s, np.float32) for s in shapes)
        return tuple(np.concatenate(store) for store in parts)
