"""``fetch --worker I/N``: one balanced share of the plan, staged by a local pool.

Shares run on separate machines of a job array, each with the same plan; their files never
overlap (``planner.share_files``), and a file another run happens to be staging is waited
for, not failed. Once every share is staged, one ``finalize`` writes the shards.
"""

from __future__ import annotations

from ..models import Plan
from ..planner import share_files
from .local import Pool


class Share(Pool):
    name = "share"

    def __init__(self, processes: int, index: int, total: int):
        super().__init__(processes)
        self.index = index
        self.total = total

    def units(self, plan: Plan) -> list[int]:
        mine = {pf.path for pf in share_files(plan, self.total, self.index)}
        return [u for u, pf in enumerate(plan.files) if pf.path in mine]
