"""``hetero-sched serve``: an OpenAI-compatible front door over a :class:`ServeCore`.

- ``servecore``: the seam an engine implements (requests in, token events out, cancellation);
- ``openai_api``: OpenAI's wire format, validated; ``app``: the aiohttp routes;
- ``metrics``: ``/metrics`` with vLLM's names; ``tokenizer``: the shipped byte tokenizer;
- ``ingress``: the server as a Ray actor on the driver's node;
- ``fakecore``: a test double of the engine (tests and load-generator plumbing only).
"""

from hetero_sched.serve.ingress import Ingress, ServeOptions, serve_app, start_ingress
from hetero_sched.serve.servecore import (CoreStatus, EventStream, FinalEvent, FinishReason, GroupStatus, ModelCard,
                                          Rejected, ServeCore, ServeRequest, TokenEvent, TokenStream)
from hetero_sched.serve.tokenizer import ByteTokenizer, packaged_tokenizer_dir, write_tokenizer

__all__ = ["ByteTokenizer", "CoreStatus", "EventStream", "FinalEvent", "FinishReason", "GroupStatus", "Ingress",
           "ModelCard", "Rejected", "ServeCore", "ServeOptions", "ServeRequest", "TokenEvent", "TokenStream",
           "packaged_tokenizer_dir", "serve_app", "start_ingress", "write_tokenizer"]
