"""Anomaly-detection methods behind one interface (`base.Method`), found by name in
`registry.METHODS`: flow_mismatch (the primary method), radar and recon."""
