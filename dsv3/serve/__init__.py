"""`dsv3 serve`: an OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra).

scheduler.py  slots, the waiting queue and the model loop over Transformer.forward_step (no HTTP)
runner.py     the forwards it runs: static decode/verify/MTP steps, the tensor-parallel plan broadcast
speculation.py  --speculative mtp in the decode step: drafts, verification, acceptance, the MTP module's cache
drafting.py   when --speculative drafts: the adaptive off-switch (measured acceptance against step costs)
logprobs.py   log-probability entries (the model's own distribution) as the API reports them
masks.py      grammar-constrained sampling: the tokens a grammar allows next, by a walk of the vocabulary
json_mode.py  response_format json_object: one JSON object, byte by byte (a grammar of masks.py)
schema.py     response_format json_schema: JSON a schema accepts, the schema compiled to such a grammar
tools.py      tools: DeepSeek-V3's tool-call format as a grammar, calls read back, tools described
text.py       incremental detokenization and stop strings
protocol.py   OpenAI request validation, response and error bodies (no HTTP)
metrics.py    Prometheus text exposition
app.py        the Starlette app (the only module that imports the ASGI stack)
"""
