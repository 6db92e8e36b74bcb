"""The OpenAPI document shipped in the package describes exactly the server's routes, and its
Task/Capabilities/Plan schemas name exactly the records' fields."""

import dataclasses
from importlib.resources import files

import pytest

from stamen.core.plan import Plan
from stamen.core.records import Capabilities, Task
from stamen.core.train import TrainConfig
from stamen.server.app import make_app
from stamen.server.config import load_config
from stamen.server.service import Federation

yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def doc():
    return yaml.safe_load(files("stamen.mobile_bridge").joinpath("openapi.yaml").read_text())


def test_paths_match_the_server_routes(doc, tmp_path):
    fed = Federation("gpt-tiny", tmp_path, load_config())
    try:
        app = make_app(fed, tmp_path)
        served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    finally:
        fed.close()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == served


def test_schemas_match_the_records(doc):
    schemas = doc["components"]["schemas"]
    for record, name in ((Task, "Task"), (Capabilities, "Capabilities"), (TrainConfig, "TrainConfig")):
        assert set(schemas[name]["properties"]) == {f.name for f in dataclasses.fields(record)}, name
    assert set(schemas["Plan"]["properties"]) == set(Plan("p", (0,)).to_dict())
