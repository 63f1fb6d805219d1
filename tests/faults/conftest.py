import pytest

from tests.faults.harness import FaultTimings


@pytest.fixture
def fault_timings(request):
    """Random timings that ``FAULT_SEED=<seed>`` replays (tests/faults/harness.py)."""
    timings = FaultTimings()
    print(f"\n{timings.replay}")
    request.node.user_properties.append(("fault_seed", timings.fault_seed))  # junit XML
    return timings
