"""fmjax: unsupervised visual anomaly detection with flow-matching and diffusion models.

Packages: config (every setting), methods (Flow Mismatching, RADAR, the reconstruction
baseline, behind one interface), nets (the U-Net), flow (paths, loss), training (one
step, one loop, checkpoints), distributed (meshes, collectives, multi-host), data
(readers), eval (metrics, calibration, writers), runs (run folders), app (the command
line and how programs start).
"""
__version__ = "0.2.0"
