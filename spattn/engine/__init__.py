"""spattn's serving layer: ``Engine`` keeps a sequence-parallel pipeline loaded on its ranks and serves
requests over a host channel; ``spattn.engine.http`` is the OpenAI-compatible app over it (FastAPI,
imported only there)."""
from .engine import Engine, Request
from .params import (EngineBusyError, EngineDeadError, GenerationOutput, RequestCancelled, RequestFailed,
                     SamplingParams)

__all__ = ["Engine", "Request", "SamplingParams", "GenerationOutput", "EngineDeadError", "EngineBusyError",
           "RequestCancelled", "RequestFailed"]
