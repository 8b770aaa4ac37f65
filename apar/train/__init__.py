"""Training: fine-tune a causal LM on tree-packed paragraph trees (`trainer`), and the demo models
made here from scratch (`demo`); `cli` adds `apar train` and `apar demo-model`."""
