"""The APAR engine core: the step loop, scheduler, request and thread types, the KV block ledger and its
ops, the model runner, attention backends and sampler. It imports nothing from `services` and none of
gRPC, Redis, FastAPI or Kubernetes (tests/test_core_imports.py); the services are adapters over it.
Importing this package loads nothing: the request types (`params`, `events`, `prefix`) stay torch-free.
"""
