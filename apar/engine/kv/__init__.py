"""The KV block ledger (plain Python bookkeeping), its ops, and the engine's local link to it."""
