"""Synthetic inputs built deterministically in code (PDFs good and hostile, videos): what the tests and the benchmarks
read instead of checked-in fixtures or downloads. Not part of the product, not installed."""
