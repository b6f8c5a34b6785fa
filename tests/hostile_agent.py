"""A hostile agent for tests: fedtune's agent whose ClientApp speaks for another agent.

Its train replies claim to come from VICTIM and say VICTIM's privacy budget is spent (the
reply that made a coordinator retire an honest agent before names were bound to keys).

    python tests/hostile_agent.py VICTIM <fedtune client arguments>
"""

import sys

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedtune.client.client_app as honest
from fedtune.cli import main

victim = sys.argv.pop(1)
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"num-examples": 100, "epsilon": 0.5})
    info = ConfigRecord({"name": victim, "privacy-spent": "privacy budget spent"})
    return Message(RecordDict({"metrics": metrics, "info": info}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)


honest.app = app  # the agent's executor runs client.client_app.app
sys.exit(main(sys.argv[1:]))
