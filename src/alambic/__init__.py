"""alambic: distil a large language model (the teacher) into a small, fast one (the student)."""

__version__ = "0.1.0"
