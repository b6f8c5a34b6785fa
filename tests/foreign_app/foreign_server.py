"""A foreign ServerApp: marks that it ran, asks every node to train, records what came back."""

import json
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["marker-dir"]))
    (out / "server-ran").write_text("foreign code ran on the coordinator")
    deadline = time.time() + 60
    while not list(grid.get_node_ids()) and time.time() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=60)
    summary = [
        {"error": reply.error.reason, "loot": False} if reply.has_error() else {"error": None, "loot": True}
        for reply in replies
    ]
    (out / "replies.json").write_text(json.dumps(summary))
