"""The scoring progress bar (fmjax.methods.batches.scoring_progress): one bar per scoring
call of more than one batch, advanced by every image, closed at the end."""
import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto

from fmjax.methods.batches import ImageBatches, scoring_progress


class Bar:
    made = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.closed, self.desc = total, 0, False, kwargs.get("desc")
        Bar.made.append(self)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_progress_follows_the_images_scored(monkeypatch):
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    Bar.made = []
    batches = ImageBatches(lambda params, x, y, c: (jnp.mean(x.astype(jnp.float32), (1, 2, 3)) + c,), (4, 4, 1),
                           2, 1, 1, jax.local_devices()[:1])
    images = np.arange(5 * 16, dtype=np.uint8).reshape(5, 4, 4, 1)
    plain = batches({}, images, None, 1.0)[0]
    assert Bar.made == []  # outside the block: no bar
    with scoring_progress("scoring test"):
        shown = batches({}, images, None, 1.0)[0]
        batches({}, images[:2], None, 1.0)  # one batch: no bar
    np.testing.assert_array_equal(shown, plain)
    assert [(b.total, b.n, b.closed, b.desc) for b in Bar.made] == [(5, 5, True, "scoring test")]
    with scoring_progress(enabled=False):
        batches({}, images, None, 1.0)
    assert len(Bar.made) == 1
