"""`tswitch` with the build's encode pass held by a :class:`events.ShardGate` (tests only, not a test module).

    python tests/gated_cli.py GATE_DIR FREE_CALLS tswitch-args...

The first FREE_CALLS shards to start run at once; every other shard waits for
the test to open or abort the gate. The
library itself has no hook: this wrapper replaces ``shard_encode`` in the build
module before the CLI runs, the way a test's monkeypatch would in-process.
"""

from __future__ import annotations

import sys

from events import ShardGate


def main() -> None:
    root, free, *args = sys.argv[1:]
    from tswitch_ray.distributed import build

    gate = ShardGate(root, free=int(free))
    build.shard_encode = gate.wrap(build.shard_encode)
    from tswitch_ray.cli import main as cli_main

    sys.argv = ["tswitch", *args]
    cli_main()


if __name__ == "__main__":
    main()
