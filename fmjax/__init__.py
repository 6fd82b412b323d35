"""fmjax: Flow Mismatching anomaly detection with JAX/Flax.

Modules: config (run settings), nets (U-Net), flow (paths, loss), train (training loop,
checkpoints), mismatch (the scorer), metrics, data (readers), runs (run folders:
train/evaluate/predict), viz (pictures), cli.
"""
__version__ = "0.1.0"
