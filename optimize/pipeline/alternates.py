"""The other engines' files a run carries beside its own model (a stage's `alternates`: engine family
-> model handle), and, at the end, each held to the last stage's gate through its engine: what passes
ships under its engine's name (`artifact.ENGINE_FILES`), what fails is reported, not shipped."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from rich.console import Console

from optimize import costs
from optimize.artifact import write as artifact
from optimize.models.handle import ModelHandle
from optimize.pipeline import cache as stage_cache
from optimize.records import failed_checks
from optimize.runtime.engines import family
from optimize.runtime.manifest import EngineFile, GateResult

Judged = tuple[dict[str, float], GateResult]


class Alternates:
    def __init__(self) -> None:
        self.files: dict[str, ModelHandle] = {}  # engine family -> its file's model, beside the run's
        self.judged: dict[str, Judged] = {}  # what the last stage measured of them

    def adopt(
        self, keeps: bool, model: ModelHandle, alternates: Mapping[str, ModelHandle], judged: Mapping[str, Judged]
    ) -> None:
        """The other engines' files after a stage made `model`: its own, and an earlier stage's where
        its kind `keeps` them (compile); never one for the family `model` itself runs on. What this
        stage measured of them (`judged`) stands for its gate; an earlier stage's does not."""
        if not keeps:
            self.files = {}
        self.files.update(alternates)
        self.files.pop(family(model.engine), None)
        self.judged = dict(judged)

    def shipped(
        self,
        model: ModelHandle,
        last: Judged,
        cache: stage_cache.RunCache,
        measure: Callable[[ModelHandle], Judged],
        console: Console,
    ) -> tuple[list[EngineFile], dict[str, Path]]:
        """Each engine's file, fastest first (the run's model, then the alternates), each held to the
        last stage's gate (`measure`, unless the last stage judged it) or reused from the cache.
        Returns the manifest's `engines` and, per artifact file, the ONNX file it is made from."""
        found = [(model, *last)]
        for engine, handle in sorted(self.files.items()):
            step_key, cached = cache.lookup(f"{engine} file")
            if cached is not None:
                console.print(f"{engine} file: reused from the cache ({cached[0]})", highlight=False)
            start = costs.mark()
            if cached is None:
                if engine in self.judged:  # the last stage judged it against this same gate
                    measured, gate = self.judged[engine]
                else:
                    with console.status(f"measuring the {engine} file"):
                        measured, gate = measure(handle)
                entry: stage_cache.Entry = {"step": f"{engine} file", "metrics": measured, "gate": gate}
                cache.put(step_key, {**entry, "costs": costs.since(start)})
            else:
                measured, gate = cached[1]["metrics"], cached[1]["gate"]
                costs.replay(cached[1].get("costs", []))
            if gate["passed"]:
                found.append((handle, measured, gate))
            else:
                console.print(
                    f"[yellow]warning:[/] the {engine} file is not shipped: {failed_checks(gate)}", highlight=False
                )
        engines: list[EngineFile] = []
        shipped: dict[str, Path] = {}
        for handle, measured, gate in found:
            name = artifact.ENGINE_FILES.get(family(handle.engine), "model.onnx")
            engines.append({"engine": handle.engine, "file": name, "metrics": measured, "gate": gate})
            shipped[name] = handle.onnx_path or handle.checkpoint  # a file, or a folder format
        assert model.onnx_path is not None
        shipped.setdefault("model.onnx", model.onnx_path)  # where no onnxruntime file holds: the run's graph
        return engines, shipped
