import uvloop
from hypothesis import settings

# No per-example deadline (Hypothesis' default is 200 ms): it is a timed assertion,
# and the unit tests share the machine with a system test in the other pytest
# process (docs/decisions.md §26).
settings.register_profile("weft", deadline=None)
settings.load_profile("weft")


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}
