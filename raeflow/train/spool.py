"""The path of Ray Train progress to the driver, on the controller's side: kept free of torch.

Each worker's ``ray.train.report`` carries its relay items (log lines; rank 0 adds the epoch's metrics row) under
:data:`RELAY_KEY`. :class:`SpoolCallback` runs in the TrainController, which Ray Train places on the driver's node,
and appends them to :data:`SPOOL` in the run directory; the driver's relay thread tails that file
(``raeflow.train.ray_engine``). The callback is unpickled in the controller, so this module must not import torch
(nor anything that does): a controller that imports torch measured 265 MiB PSS against 131 without.
"""
from __future__ import annotations

import json
from typing import Any

from ray.train import UserCallback

#: Key of the reported metrics that carries a worker's relay items to the controller.
RELAY_KEY = "raeflow_relay"
SPOOL = ".relay.jsonl"  # in the run directory; removed when fit returns


class SpoolCallback(UserCallback):
    """In the TrainController: appends the relay items of every report to the spool, rank by rank.

    A queue actor did this before: one more Ray process (67 MiB PSS measured) for a few lines an epoch.
    """

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        items = [item for m in metrics for item in (m or {}).get(RELAY_KEY, ())]
        if items:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(item) + "\n" for item in items))
