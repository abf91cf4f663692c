"""Evaluation: metrics, speed and memory, HTML reports, and the demos (`alambic eval`, `report`, `demo`)."""
