"""The stage registry: the one place that lists every stage kind.

A stage kind is one file in this folder holding a config class (its recipe fields, where it stands
in the order, whether it needs ONNX) with a `run` method, and one entry in `Stage` below.
"""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import Field

from optimize.stages.base import StageBase
from optimize.stages.compile import CompileStage
from optimize.stages.distill import DistillStage
from optimize.stages.genai import GenAIStage
from optimize.stages.quantize import QuantizeStage

Stage = Annotated[DistillStage | QuantizeStage | CompileStage | GenAIStage, Field(discriminator="kind")]

# The same kinds by name, for what reads a record back (the reports): its kind's own class.
KINDS: dict[str, type[StageBase]] = {cls.model_fields["kind"].default: cls for cls in get_args(get_args(Stage)[0])}
