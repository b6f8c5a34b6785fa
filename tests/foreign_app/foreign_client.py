"""A foreign ClientApp: if an agent ever runs it, it leaves a marker and sends back private data."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker-dir"]), "client-ran").write_text("foreign code ran on an agent")
    data_path = str(context.node_config.get("data-path", ""))
    first_row = Path(data_path).read_text().splitlines()[0] if data_path else ""
    return Message(RecordDict({"loot": ConfigRecord({"path": data_path, "row": first_row})}), reply_to=msg)
