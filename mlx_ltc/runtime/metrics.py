"""`metrics.jsonl`: one JSON line per update, appended as the run goes. A rollback or a resume cuts it
back to what its checkpoint knows (a kill may have cut the last line short; it goes too)."""

import json
from pathlib import Path

from mlx_ltc import atomic


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def rows(self) -> list:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # the line a kill cut short
                break
        return rows

    def start(self) -> None:
        atomic.write_text(self.path, "")

    def keep(self, wanted) -> None:
        """Cut back to the rows for which wanted(row) is true."""
        atomic.write_jsonl(self.path, [r for r in self.rows() if wanted(r)])

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
