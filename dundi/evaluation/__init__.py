"""Adversarial evaluation of runs: the resumable sharded evaluation, its Parquet rows and
summaries, and the reports made from them."""
