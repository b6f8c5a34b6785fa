"""fedtune's ClientApp, except that every message loads the base model afresh."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.client import client_app, job

app = ClientApp()


def _fresh_model(context: Context) -> None:
    client_job = job.ClientJob.for_context(context)
    job.SHARED_MODEL.model = None  # forget it: the next get loads the base model again
    client_job.model = job.SHARED_MODEL.get(client_job.config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _fresh_model(context)
    return client_app.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _fresh_model(context)
    return client_app.evaluate(msg, context)
