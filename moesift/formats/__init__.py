"""Files: trace, plan and calibration formats, checkpoint index, trimmed layout, workloads, the WCER codec."""
