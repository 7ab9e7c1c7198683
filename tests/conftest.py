"""Shared pytest setup for riskfast tests.

The environment variables must be set before anything imports Triton or
transformers: Triton needs ``TRITON_INTERPRET=1`` on a machine without a GPU,
and offline flags stop hub look-ups from retrying DNS.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings

settings.register_profile(
    "riskfast",
    derandomize=True,
    database=None,
    max_examples=60,
    deadline=None,
    print_blob=True,
)
settings.load_profile("riskfast")
