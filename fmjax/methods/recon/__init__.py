"""The flow reconstruction baseline: settings.py (pure Python), scorer.py, method.py."""
