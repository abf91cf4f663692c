"""Hard-target ("data") distillation: ask a teacher to answer, label or explain, then train the student on it.

    alambic generate configs/generate_label.yaml          # collect teacher answers (resumable)
    alambic train-classifier configs/generate_classifier.yaml

Teachers: any OpenAI-compatible server (`openai`), a local transformers model
(`hf`), or vLLM's engine (`vllm`, optional). See docs/data-distillation.md.
"""
