"""fedtune's ClientApp, with malformed replies from fixed partitions (after honest training).

- partition 0: ``num-examples = inf`` in round 1; in round 2 a layout with a negative
  dimension whose sizes still sum to the payload;
- partition 1: a NaN train loss;
- partition 2: evaluate replies claiming accuracy 333333333.69 and ``num-examples = inf``.
"""

import math

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.client import client_app

app = ClientApp()


def _rewrite(msg: Message, reply: Message, metrics: dict | None = None, layout: dict | None = None) -> Message:
    content = RecordDict(dict(reply.content.items()))
    if metrics is not None:
        content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), **metrics})
    if layout is not None:
        content["layout"] = ConfigRecord({**dict(reply.content["layout"]), **layout})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = client_app.train(msg, context)
    partition, round_number = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
    if partition == 0 and round_number == 1:
        return _rewrite(msg, reply, metrics={"num-examples": math.inf})
    if partition == 0:
        shape = [int(d) for d in reply.content["layout"]["shape"]]
        first = shape[0]  # a (first, x) tensor becomes (-first, -x): same element count, negative dimensions
        shape[0], shape[1] = -first, -shape[1]
        return _rewrite(msg, reply, layout={"shape": shape})
    if partition == 1:
        return _rewrite(msg, reply, metrics={"train_loss": math.nan})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = client_app.evaluate(msg, context)
    if int(context.node_config["partition-id"]) != 2:
        return reply
    return _rewrite(msg, reply, metrics={"accuracy": 333333333.69, "num-examples": math.inf})
