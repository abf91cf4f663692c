"""Fixtures of the recipe tests that several modules share."""

import pytest


@pytest.fixture(scope="session")
def served_tiny(tmp_path_factory):
    """A tiny real teacher behind the loopback prompt-logprob server (built once for every served-teacher test)."""
    import served_fixtures

    built = served_fixtures.build_tiny(tmp_path_factory.mktemp("served"))
    yield built
    built.server.stop()
