"""The component registry: capabilities declared on specs, entry points, and a third-party
source (defined only here) validated, built and run through a pipeline."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sluice import intake, registry, runtime
from sluice.config.load import parse_pipeline, pipeline_schema
from sluice.connectors.base import Delivery
from sluice.datadir import Database, QueuedMessage
from sluice.errors import ConfigError, SluiceError, Unsupported
from sluice.registry import Capability, ComponentSpec, Registry
from sluice.spec import Field, ObjectSpec
from sluice.stores.sqlite import SqliteStore
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState


class ToySource:
    """A third party's source: ``count`` messages held in memory."""

    lease_s = 30.0

    def __init__(self, count: int) -> None:
        self._waiting = [Delivery(f"toy-{i}", json.dumps({"n": i}).encode()) for i in
                         range(count)]
        self._unfinished = {d.task_id for d in self._waiting}
        self.closed = False

    async def start(self) -> None:
        return None

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        taken, self._waiting = self._waiting[:max_n], self._waiting[max_n:]
        if not taken:
            await asyncio.sleep(min(wait_s, 0.01))
        return taken

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._unfinished.difference_update(d.task_id for d in deliveries)

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        self._waiting.extend(d for d, _ in deliveries)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return None

    async def pending(self) -> int:
        return len(self._unfinished)

    async def close(self) -> None:
        self.closed = True


def build_toy(config: dict[str, Any], ctx: registry.BuildContext) -> ToySource:
    return ToySource(int(config["count"]))


TOY = ComponentSpec(
    family="source",
    name="toy",
    summary="A toy source: count messages in memory.",
    config=ObjectSpec(Field("count", "integer", "Messages to hand out.", default=3, minimum=0)),
    factory=build_toy,
)

TOY_PIPELINE = """\
name: toys
source: {toy: {count: 5}}
handler: {python: "tests.helpers.handlers:echo"}
"""


def test_built_in_sources_declare_their_capabilities() -> None:
    assert registry.get("source", "embedded").capabilities == {
        Capability.SUBMIT, Capability.DELAYED_REDELIVERY, Capability.KEY_ORDER}
    assert registry.get("source", "kafka").capabilities == {
        Capability.SUBMIT, Capability.OUTPUTS_WITH_ACK, Capability.UNTRACKED,
        Capability.EXACTLY_ONCE}
    assert registry.with_capability("source", Capability.SUBMIT) == [
        "embedded", "kafka", "mqtt", "nats", "rabbitmq", "redis"]
    assert registry.with_capability("source", Capability.DELAYED_REDELIVERY) == [
        "embedded", "mqtt", "rabbitmq"]
    assert registry.with_capability("source", Capability.OUTPUTS_WITH_ACK) == [
        "kafka", "nats", "redis"]
    for spec in registry.components("source"):
        if spec.can(Capability.SUBMIT):
            assert spec.submitter is not None, spec.name


def test_a_capability_without_its_hook_is_refused() -> None:
    with pytest.raises(ValueError, match="capability submit needs the submitter hook"):
        ComponentSpec(family="source", name="half", summary="", config=ObjectSpec(),
                      factory=build_toy, capabilities=frozenset({Capability.SUBMIT}))
    with pytest.raises(ValueError, match="outputs_with_ack needs the outputs_with_ack hook"):
        ComponentSpec(family="source", name="half", summary="", config=ObjectSpec(),
                      factory=build_toy, capabilities=frozenset({Capability.OUTPUTS_WITH_ACK}))


def test_a_registry_object_starts_from_the_built_ins_and_keeps_its_own() -> None:
    reg = Registry(entry_point_group=None)
    reg.register(TOY)
    assert reg.names("source") == ["embedded", "kafka", "mqtt", "nats", "rabbitmq", "redis",
                                   "toy"]
    assert reg.names("sink") == registry.names("sink")
    assert "toy" not in registry.names("source")  # the default registry is not touched
    schema = pipeline_schema(reg)
    assert "toy" in schema["properties"]["source"]["properties"]
    with registry.using(reg):
        assert registry.get("source", "toy") is TOY
    assert "toy" not in registry.names("source")


def write_distribution(root: Path, entry_points: str, modules: dict[str, str]) -> None:
    """An installed distribution in ``root``: its dist-info (with entry points) and modules."""
    info = root / "toy_sluice-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-sluice\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, text in modules.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_entry_points_register_a_module_and_a_callable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    registry.load_builtins()  # the default registry, loaded before the package is installed
    write_distribution(tmp_path, """\
        [sluice.components]
        toy = toy_sluice
        toy_sink = toy_sluice.sinks:register
        """, {
        "toy_sluice/__init__.py": """\
            from sluice import registry
            from sluice.spec import Field, ObjectSpec

            registry.register(registry.ComponentSpec(
                family="source", name="toy_ep", summary="A toy source from a package.",
                config=ObjectSpec(Field("count", "integer", "Messages.", default=1)),
                factory=lambda config, ctx: None))
            """,
        "toy_sluice/sinks.py": """\
            from sluice import registry
            from sluice.spec import Field

            def register(reg: registry.Registry) -> None:
                reg.register(registry.ComponentSpec(
                    family="sink", name="toy_ep_sink", summary="A toy sink from a package.",
                    config=Field("toy_ep_sink", "string", "Where."),
                    factory=lambda config, ctx: None))
            """,
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    with registry.using(reg):
        assert "toy_ep" in registry.names("source")
        assert "toy_ep_sink" in registry.names("sink")
        assert registry.get("source", "toy_ep").summary == "A toy source from a package."
        assert "embedded" in registry.names("source")
    assert "toy_ep" not in registry.names("source")
    # Another registry gets the module's specs too, though the module is imported already.
    again = Registry()
    assert {"toy_ep", "toy_ep_sink"} <= set(again.names("source") + again.names("sink"))


def test_a_broken_entry_point_is_an_error_naming_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    registry.load_builtins()
    write_distribution(tmp_path, """\
        [sluice.components]
        broken = toy_sluice_missing.nowhere
        """, {})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SluiceError, match=r"entry point broken = toy_sluice_missing.nowhere "
                       r"\(group sluice.components\): cannot register its components: "
                       r"ModuleNotFoundError"):
        Registry().load()
    broken = Registry()
    for _ in range(2):  # not half loaded after a failure: each use says it again
        with pytest.raises(SluiceError, match="entry point broken"):
            broken.names("source")


def test_a_third_party_source_is_validated_built_and_run(tmp_path: Path) -> None:
    reg = Registry(entry_point_group=None)
    reg.register(TOY)
    with registry.using(reg):
        config = parse_pipeline(TOY_PIPELINE, "toys.yaml")
        assert config.source.config == {"count": 5}
        assert config.dead_letter.type == "embedded"  # the registry's default dead letter
        assert not intake.submittable(config) and not intake.delays(config)
        with pytest.raises(ConfigError) as caught:
            parse_pipeline(TOY_PIPELINE.replace("count: 5", "count: -1"), "toys.yaml")
        assert [str(i) for i in caught.value.issues] == [
            "toys.yaml:2:23: source.toy.count: expected an integer >= 0, got -1"]
        loop = runtime.build(config, tmp_path)
        stats = asyncio.run(asyncio.wait_for(
            runtime.run_pipelines([loop], asyncio.Event(), drain=True), 120))
    assert [s.succeeded for s in stats] == [5]
    assert isinstance(loop.source, ToySource) and loop.source.closed
    store = SqliteTaskStore(Database.open(tmp_path))
    records = [asyncio.run(store.get(f"toy-{i}", "toys")) for i in range(5)]
    assert [(r.state, r.attempts) for r in records] == [(TaskState.SUCCEEDED, 1)] * 5


def test_the_loader_says_what_a_source_cannot_do_from_its_capabilities() -> None:
    reg = Registry(entry_point_group=None)
    reg.register(TOY)
    with registry.using(reg), pytest.raises(ConfigError) as caught:
        parse_pipeline(TOY_PIPELINE + "consumer: {exactly_once: true, track_tasks: false}\n",
                       "toys.yaml")
    assert [str(i) for i in caught.value.issues] == [
        "toys.yaml:4:26: consumer.exactly_once: exactly_once needs a kafka source (its offsets "
        "are committed in the results' transaction); this source is toy",
        "toys.yaml:4:45: consumer.track_tasks: track_tasks: false needs a kafka source (its "
        "committed offsets record what is finished); this source is toy"]


def test_the_submit_service_refuses_what_the_source_cannot_do(tmp_path: Path) -> None:
    db = SqliteStore(Database.open(tmp_path))
    kafka = parse_pipeline('name: k\nsource: {kafka: {brokers: "h:1", topic: t}}\n'
                           'handler: {python: "tests.helpers.handlers:echo"}\n')
    embedded = parse_pipeline("name: e\nsource: {embedded: {queue: q}}\n"
                              'handler: {python: "tests.helpers.handlers:echo"}\n')
    message = QueuedMessage("t-1", b"{}")
    with pytest.raises(Unsupported, match="a kafka source has no delayed delivery"):
        asyncio.run(intake.submit(db, kafka, [message], delay_s=5))
    (created,) = asyncio.run(intake.submit(db, embedded, [message], delay_s=5))
    assert created is not None and created.state == TaskState.QUEUED
    assert asyncio.run(intake.submit(db, embedded, [message])) == [None]  # the id is used
    reg = Registry(entry_point_group=None)
    reg.register(TOY)
    with registry.using(reg):
        toys = parse_pipeline(TOY_PIPELINE)
        with pytest.raises(Unsupported, match=r"pipeline 'toys': submitting to a 'toy' source "
                           r"is not supported; only to embedded and kafka"):
            asyncio.run(intake.submit(db, toys, [message]))
    found = asyncio.run(db.tasks.find("t-1"))  # none made by the refusals
    assert [(r.pipeline, r.state) for r in found] == [("e", TaskState.QUEUED)]
