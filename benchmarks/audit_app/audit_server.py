"""fedtune's ServerApp, behind a Grid that writes down what an honest-but-curious coordinator reads.

For every train reply it appends one JSON line to ``$FEDTUNE_AUDIT_OUT``: the round, the
client's name and the change of the classifier head's bias as the coordinator can read it. In
the clear that is the sent bias minus the broadcast one. Under secure aggregation it is the
bias coordinates of the masked vector read as if they were unmasked (value · 2c/T − c): the
best a coordinator can do with one client's upload. Nothing else changes: the run is fedtune's.
"""

import json
import os

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedtune.coordinator import server_app
from fedtune.core import secagg, wire

app = ServerApp()


class RecordingGrid:
    def __init__(self, grid: Grid, out: str) -> None:
        self.grid, self.out, self.sent, self.clip = grid, out, {}, None

    def __getattr__(self, name: str):  # noqa: ANN204 (everything else is the real Grid's)
        return getattr(self.grid, name)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        for message in messages:
            config = message.content["config"] if "config" in message.content.config_records else {}
            if "clip" in config:
                self.clip = float(config["clip"])
            if message.metadata.message_type == "train":
                broadcast = wire.decode(message.content["arrays"], message.content["layout"])
                names = list(message.content["secagg"]["names"]) if "secagg" in message.content.config_records else None
                self.sent[message.metadata.dst_node_id] = (int(config["round"]), broadcast, names)
        return self.grid.push_messages(messages)

    def pull_messages(self, ids):  # noqa: ANN001, ANN201
        replies = list(self.grid.pull_messages(ids))
        for reply in replies:
            if reply.metadata.message_type == "train" and not reply.has_error():
                self._note(reply)
        return replies

    def _note(self, reply: Message) -> None:
        rnd, broadcast, names = self.sent[reply.metadata.src_node_id]
        bias = next(name for name in sorted(broadcast) if "classifier" in name and name.endswith("bias"))
        if "masked" in reply.content.array_records:
            vector = reply.content["masked"]["values"].numpy().astype(np.float64)
            offset = sum(broadcast[name].numel() for name in names[: names.index(bias)])
            values = vector[offset : offset + broadcast[bias].numel()]
            change = values * (2 * self.clip / secagg.TARGET_RANGE) - self.clip
        elif "arrays" in reply.content.array_records:
            sent = wire.decode(reply.content["arrays"], reply.content["layout"])
            change = (sent[bias] - broadcast[bias]).double().numpy()
        else:
            return
        name = str(reply.content["info"]["name"])
        with open(self.out, "a") as out:
            out.write(json.dumps({"round": rnd, "name": name, "bias_change": [float(v) for v in change]}) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    server_app.main(RecordingGrid(grid, os.environ["FEDTUNE_AUDIT_OUT"]), context)
