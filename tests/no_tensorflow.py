"""Preamble for subprocess scripts that check TFDS reads work without importing TensorFlow:
it records every real attempt to import tensorflow in the list `attempts`."""

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
