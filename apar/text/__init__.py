"""Text in and out of the engine, shared by the router and the in-process tools (`apar generate`,
evaluation, the benches): the prompt to token ids (`prompt.py`), the thread tree back into text
(`stitch.py`), one request's events into the stream a user reads (`stream.py`). Pure Python over token
ids and a tokenizer: no torch, no gRPC, nothing from `services` (tests/test_core_imports.py), so the
router, which never loads torch, uses it as it is.
"""
