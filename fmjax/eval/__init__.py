"""Evaluation: exact metrics (`metrics`), thresholds fitted on normal images only
(`calibration`), TIFF maps, score tables and pictures (`writers`, `viz`)."""
