"""fedtune's ClientApp, except that every message loads the base model afresh (FlowerTune's way).

It goes through fedtune's own loader (``SharedModel.get``), so each load is counted in the
``model-loads`` every reply reports; benchmarks/framework_overhead.py and
tests/test_reload_app.py check that the count is one per message."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client import client_app, job

app = ClientApp()


def _fresh_model(context: Context) -> None:
    client_job = job.ClientJob.for_context(context)
    job.SHARED_MODEL.forget()  # the next get loads the base model again
    client_job.model = job.SHARED_MODEL.get(client_job.config, client_job.rank)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _fresh_model(context)
    return client_app.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _fresh_model(context)
    return client_app.evaluate(msg, context)
