"""Demos: a real teacher distilled end to end (BBC News classification, stdlib-code LM), and the LM teacher's training script."""
