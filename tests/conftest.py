import os

import pytest
import torch

from wan_i2v.tiny import write_tiny_checkpoint

# The tests run on two CPU cores: more threads only add contention.
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def home_of_the_tests(tmp_path_factory):
    """$WAN_I2V_HOME for the whole session: what runs write there (converted copies, compiled code) stays out of the user's."""
    os.environ["WAN_I2V_HOME"] = str(tmp_path_factory.mktemp("wan-i2v-home"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint in the official layout (read-only: copy it to damage it)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from wan_i2v import I2VPipeline

    return I2VPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session (Debian's package; CI installs it)."""
    import os

    from postgres_process import Postgres, binary

    if binary("initdb") is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        assert not os.environ.get("CI"), message  # CI installs it (.ci/run): there a missing server is a failure
        pytest.skip(message)
    server = Postgres().start()
    yield server
    server.remove()


@pytest.fixture()
def queue_url(postgres) -> str:
    """A new, empty PostgreSQL database for one test's queue."""
    return postgres.new_database()
