"""Pipelines: class-conditional latent DiT sampling with flow matching (paper Section 4), images and videos."""

# Importing the models registers `selfcond_dit.SelfConditionedDiT`, so that `DiTFlowMatchPipeline.from_pretrained`
# finds a saved custom transformer without running its copied file (no `trust_remote_code` needed here).
from ..models import selfcond_dit  # noqa: F401
from .pipeline_dit_flow import DiTFlowMatchPipeline, DiTFlowMatchVideoPipeline, DiTFlowMatchVideoPipelineOutput

__all__ = ["DiTFlowMatchPipeline", "DiTFlowMatchVideoPipeline", "DiTFlowMatchVideoPipelineOutput"]
