"""The coordinator: upstream data and status events to the apps' webhooks, and cross-service kick.

Layers: ``webhooks`` (delivery core: per-app bounded queues, batching, signing, retry, rate
limit) and ``kick`` (register lookup → room fan-out) are the core; ``webhook_http`` is the
aiohttp transport; ``grpc_adapter`` is the thin gRPC face; ``main`` wires them together.
"""
