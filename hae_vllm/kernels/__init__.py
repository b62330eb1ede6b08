"""Triton kernels for scoring and compaction, each with a plain-torch reference that is also
the CPU path (``*_ref``).  Tests compare them with ``TRITON_INTERPRET=1`` on CPU."""
