"""The end-to-end demo (``make demo`` = ``python -m bench.demo``): a synthetic dataset, a small trained SCAN,
and the whole product run on it. The top layer: it uses export/, runtime/ and bench/, nothing uses it."""
