"""The project's lab: what builds, trains and probes the test and evaluation models, and the
harnesses the tests and benchmarks drive (multi-turn conversations, ``vllm serve`` on loopback,
the accuracy suites).  It lives in the source checkout only; the ``hae_vllm`` package a serving
user installs never imports it."""
