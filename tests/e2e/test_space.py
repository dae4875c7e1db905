"""A new version costs only what changed."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

from tests.helpers import cli

MiB = 1 << 20
CHUNK = 64 * 1024


def du(path: Path) -> int:
    return int(
        subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    )


def test_second_version_with_5_percent_changed_grows_the_store_by_at_most_6_percent(
    tmp_path: Path, store_path: Path
) -> None:
    size = 512 * MiB
    v1, v2 = tmp_path / "v1.raw", tmp_path / "v2.raw"
    with open(v1, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    subprocess.run(["cp", "--sparse=never", str(v1), str(v2)], check=True)
    nchunks = size // CHUNK
    changed = random.Random(5).sample(range(nchunks), nchunks * 5 // 100)
    with open(v2, "r+b") as f:
        for i in changed:
            f.seek(i * CHUNK)
            f.write(os.urandom(CHUNK))

    cli("base", "import", "big", str(v1), store=store_path)
    after_v1 = du(store_path)
    cli("base", "import", "big", str(v2), store=store_path)
    growth = du(store_path) - after_v1
    print(f"v1 {after_v1 / MiB:.1f} MiB in the store; v2 added {growth / MiB:.1f} MiB ({growth / size:.2%} of v1)")
    assert growth <= 0.06 * size

    rows = json.loads(cli("base", "list", "--json", store=store_path).stdout)["versions"]
    v1_row, v2_row = rows
    assert v2_row["unique"] == len(changed) * CHUNK
    assert v1_row["shared"] == v2_row["shared"] == (nchunks - len(changed)) * CHUNK
    table = cli("base", "list", store=store_path).stdout
    assert f"{len(changed) * CHUNK / MiB:.1f} MiB" in table  # the space only v2 holds, as the operator sees it
