"""Hypothesis profiles for the property-based tests: ``ci`` (the default, bounded so that the whole folder runs in
well under a minute) and ``long`` (``HYPOTHESIS_PROFILE=long pytest tests/fuzz``: 50x the examples, by hand)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
