"""The MoE engine: GLM-4.5 checkpoints in, token ids and routing traces out (see engine.py for the boundary)."""

from workbench.engine.config import PRESETS, ConfigError, GLMConfig
from workbench.engine.engine import Engine
from workbench.engine.request import GenerationResult, Request, StreamToken, TokenStream
from workbench.engine.routing import RoutingTrace
from workbench.engine.sampling import SamplingParams
from workbench.engine.tokenizer import Tokenizer, TokenizerError
from workbench.engine.weights import CheckpointError

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "Engine", "GLMConfig", "GenerationResult", "Request",
    "RoutingTrace", "SamplingParams", "StreamToken", "TokenStream", "Tokenizer", "TokenizerError",
]
