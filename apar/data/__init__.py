"""Training data for APAR: conversations -> paragraph trees -> tree-packed training examples.

`readers` loads conversations (AlpacaEval JSON or prompt/response JSONL), `rules` builds a paragraph
tree from each response, `tree` holds the tree type (restoration, thread texts, JSON), `pipeline` writes
and reads tree files and computes statistics, `packing` turns a tree into one training sequence.
"""
