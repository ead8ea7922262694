"""Run this exported student: `python example.py [text ...]`. It needs onnxruntime, numpy and tokenizers only."""

import sys
from pathlib import Path

from runtime import load  # runtime.py, beside this file

model = load(Path(__file__).parent)  # the format the pipeline's gates passed; load(folder, "onnx") for another
inputs = sys.argv[1:] or model.config["examples"]
if model.config["task"] == "causal_lm":
    for prompt in inputs:
        print(f"{prompt!r} -> {model.generate(prompt, max_new_tokens=24)!r}")
else:
    for text, (label, probability) in zip(inputs, model.predict(inputs), strict=True):
        print(f"{label} ({probability:.3f}): {text}")
