"""`apar bench trace|live|hf|gpu`: APAR beside AR (and HF generate) at increasing concurrency, one run.

Data flow: a workload (`workloads.py`) turns its source into `Job`s per mode (replayed answer trees,
test-split prompts, or fixed-length random prompts) -> `driver.run_levels` keeps C jobs in flight per
level on one engine per mode (closed loop: the next job goes in as soon as one finishes), AR and APAR
alternating level by level, and measures each level from the engine's public events and counters ->
`Run`s (one per pool setting) -> `report.py` writes DIR/<workload>.json and DIR/<workload>.png and
prints the tables and the ratios. `gpu.py` runs trace and hf on a 7B-shaped random model in one command.
"""
