"""Checks shared by the dataset reader tests."""


def assert_same(a, b):
    """Two Datasets hold identical arrays, labels, names and masks."""
    assert (a.category, a.name) == (b.category, b.name)
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        for field in ("images", "masks", "labels", "original_sizes"):
            x, y = getattr(split_a, field), getattr(split_b, field)
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), field
        assert split_a.names == split_b.names and split_a.defect_types == split_b.defect_types
        assert (split_a.full_masks is None) == (split_b.full_masks is None)
        for x, y in zip(split_a.full_masks or [], split_b.full_masks or []):
            assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all()


# Preamble for subprocess scripts that check TFDS reads work without importing TensorFlow:
# it records every real attempt to import tensorflow in the list `attempts`.
TENSORFLOW_IMPORT_RECORDER = r"""
import importlib.abc, json, sys, traceback

attempts = []


class Recorder(importlib.abc.MetaPathFinder):
    # Records every attempt to import tensorflow; importlib.util.find_spec probes
    # (libraries asking whether it is installed) are not imports and are ignored.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "tensorflow":
            probe = any(f.name == "find_spec" and "importlib" in f.filename and "util" in f.filename
                        for f in traceback.extract_stack())
            if not probe:
                attempts.append(name)
        return None


sys.meta_path.insert(0, Recorder())
"""
