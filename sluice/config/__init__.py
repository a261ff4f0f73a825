"""Pipeline files: load, validate, and the typed model."""

from sluice.config.load import load_pipeline, parse_pipeline, pipeline_schema
from sluice.config.model import PipelineConfig

__all__ = ["PipelineConfig", "load_pipeline", "parse_pipeline", "pipeline_schema"]
