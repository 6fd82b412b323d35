"""Flow Mismatching: settings.py (pure Python), scorer.py and chunking.py (the jitted
scorer), method.py (the `Method`)."""
