"""Plain helpers shared by the tests; fixtures live in ``tests/conftest.py``. Test modules import these
(``from support.settings import make_settings``), never each other.

- ``settings``: server settings with the tests' defaults (``make_settings``, ``loopback_settings``)
- ``images``: queries for lenet-mnist (``SHAPE``, ``pixels``, ``png_bomb``)
- ``servers``: driving and reading a server under test (``serving``, ``wait_until``, ``error_of``,
  ``bearer``, ``metric_value``, ``served_queries``)
- ``fakes``: ``GatedDefense``, a defense that holds the model thread at a gate
- ``faults``: fault-injecting fakes (``FaultyDefense``, ``SlowDefense``, ``marked``) and the fake server
  process (``python tests/support/faults.py --port P``)
- ``redis_server``: a real ``redis-server`` of the test's own on a free port (``RedisServer``), and the body
  of a process that spends budget (``spend_in_process``)
- ``numerics``: tolerances for floats computed along different paths (``PATH_ATOL``, ``CHANGED``,
  ``top1_margin``)

Servers on a real loopback port come from ``measure.launcher`` (``in_thread``, ``spawned``).
"""
