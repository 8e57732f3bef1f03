"""The node's preparation pool is sized from the machine (issue 16: worker counts from the
machine by default): one process per core, at least one per runner worker and one for the
inference API; ``limits.prepare_processes`` sets it; ``decode_memory_mib: 0`` decodes in-process."""

from __future__ import annotations

import os

from node.app import preparation_pool
from node.settings import Settings


def test_the_pool_defaults_to_the_machine_and_follows_the_setting(tmp_path) -> None:  # noqa: ANN001
    settings = Settings(storage={"data_dir": str(tmp_path)}, runner={"workers": 1})
    pool = preparation_pool(settings)
    assert pool is not None and pool.size == max(2, os.cpu_count() or 1)
    many = Settings(storage={"data_dir": str(tmp_path)}, runner={"workers": 8})
    assert preparation_pool(many).size == max(9, os.cpu_count() or 1)
    fixed = Settings(storage={"data_dir": str(tmp_path)}, limits={"prepare_processes": 5})
    assert preparation_pool(fixed).size == 5
    none = Settings(storage={"data_dir": str(tmp_path)}, limits={"decode_memory_mib": 0})
    assert preparation_pool(none) is None
