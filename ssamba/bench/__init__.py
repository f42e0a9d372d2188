"""Speed and memory benchmarks. Targets live here, never in timed unit tests.

`python -m ssamba.bench <name>` runs one; `all` runs every one. Each benchmark
module exposes `run(out_dir: Path, quick: bool) -> list[dict]` rows, printed as a
table and written as CSV to `out_dir/<name>.csv`.
"""
